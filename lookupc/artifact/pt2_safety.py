"""Can loading this ``.pt2`` run code? Checked before ``torch.export.load`` touches it.

``torch.export.load`` (torch 2.13) unpickles with ``weights_only=False`` in three places:
weights or tensor constants whose archive entry says ``use_pickle``, custom and opaque
object constants, and the example inputs when a ``weights_only=True`` load of them fails
(it silently falls back). Legacy ``<model>.pt`` weight/constant files go the same way. A
``.pt2`` is therefore as dangerous as a pickle unless none of those entries is present.

:func:`check_pt2` reads the archive as a zip and its JSON configs, refuses any entry that
would be unpickled unsafely, and loads the example inputs itself with
``weights_only=True`` (the restricted unpickler, which cannot run code). Programs that
``torch.export.save`` writes for plain-tensor models - every program lookupc writes -
pass. The archive layout is torch's private format; its names come from
``torch.export.pt2_archive.constants`` so a layout change fails loudly here.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from ..errors import LookupcError

__all__ = ["UnsafePt2Error", "check_pt2"]


class UnsafePt2Error(LookupcError):
    """A ``.pt2`` archive holds entries that ``torch.export.load`` would unpickle unsafely."""


def _layout():
    from torch.export.pt2_archive import constants as c

    return c


def check_pt2(path: str | Path) -> None:
    """Raise :class:`UnsafePt2Error` when loading ``path`` could execute code."""
    import torch

    c = _layout()
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise UnsafePt2Error(f"{path}: not a .pt2 archive ({err})") from None
    with archive:
        names = archive.namelist()
        prefix = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""

        def read(name: str) -> bytes:
            return archive.read(prefix + name)

        have = {n[len(prefix):] for n in names if n.startswith(prefix)}
        models = sorted(n[len(c.MODELS_DIR):-len(".json")] for n in have
                        if n.startswith(c.MODELS_DIR) and n.endswith(".json"))
        problems = []
        for model in models:
            for legacy in (f"{c.WEIGHTS_DIR}{model}.pt", f"{c.CONSTANTS_DIR}{model}.pt"):
                if legacy in have:
                    problems.append(f"{legacy} (a legacy pickled file)")
            for cfg_name, kind in ((c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), "weight"),
                                   (c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), "constant")):
                if cfg_name not in have:
                    continue
                config = json.loads(read(cfg_name)).get("config", {})
                for fqn, meta in config.items():
                    entry = str(meta.get("path_name", ""))
                    if meta.get("use_pickle"):
                        problems.append(f"{kind} {fqn!r} (pickled)")
                    elif kind == "constant" and not entry.startswith(
                            c.TENSOR_CONSTANT_FILENAME_PREFIX):
                        problems.append(f"constant {fqn!r} ({entry}: a pickled object)")
            sample = c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
            if sample in have:
                try:
                    torch.load(io.BytesIO(read(sample)), weights_only=True)
                except Exception as err:  # noqa: BLE001 - torch would retry unsafely
                    problems.append(f"{sample} (needs a full unpickler: "
                                    f"{' '.join(str(err).split())[:120]})")
    if problems:
        raise UnsafePt2Error(
            f"{path}: refusing to load: torch.export.load would unpickle (and so could run "
            f"code from) {'; '.join(problems[:3])}"
            + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
            + "; re-export the model from source with torch.export.save")
