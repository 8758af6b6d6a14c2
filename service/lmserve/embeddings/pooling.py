"""How a sentence-transformers checkpoint pools its token vectors into one (mean, CLS, last token or max),
whether it normalizes and how long an input may be: read from the folder (PoolingConfig.from_folder), in
either form sentence-transformers writes (the pooling_mode_* flags of 2.x-5.x, the one `pooling_mode` key of
6.x), applied by `pool`. A folder whose modules this module cannot reproduce exactly (a Dense layer,
prompt-excluding pooling, lower-casing) is refused at load, never served with different vectors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lmserve.checkpoints.cross_encoder import model_max_positions

PoolingMode = Literal["mean", "cls", "lasttoken", "max"]
_POOLING_MODES = ("mean", "cls", "lasttoken", "max")

# sentence-transformers 1_Pooling/config.json keys -> our modes
_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
}
_UNSUPPORTED_POOLING_FLAGS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
# sentence-transformers 6.x's single-key names (and the older spellings some folders carry) -> our modes
_POOLING_NAMES = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}
# modules.json entries, by class name: the model, then pooling and normalization, which `pool` does
_MODULE_KINDS = ("Transformer", "Pooling", "Normalize")
# tokenizer_config.json's model_max_length when the tokenizer sets none (transformers' VERY_LARGE_INTEGER)
_NO_TOKENIZER_LIMIT = 10**12

def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, (dict, list)):
        raise ValueError(f"{path}: expected a JSON object")
    return data  # type: ignore[return-value]


@dataclass(frozen=True)
class PoolingConfig:
    mode: PoolingMode = "mean"
    normalize: bool = False
    max_seq_length: int = 512

    def __post_init__(self) -> None:
        if self.mode not in _POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {_POOLING_MODES}, not {self.mode!r}")
        if self.max_seq_length < 1:
            raise ValueError("max_seq_length must be positive")

    @classmethod
    def from_folder(cls, path: str | Path) -> PoolingConfig:
        """Read a sentence-transformers folder (a plain transformers folder works too).

        modules.json names the Pooling module's folder and whether a Normalize module follows;
        without it `1_Pooling/` is tried. Defaults: mean pooling, no normalization; max_seq_length is
        sentence_bert_config.json's, else tokenizer_config.json's model_max_length (where 6.x keeps it),
        capped by the model's position table (as sentence-transformers truncates, we refuse beyond it).
        Raises ValueError for a module or setting that would give other vectors than sentence-transformers.
        """
        path = Path(path)
        pooling_dir: Path | None = None
        normalize = False
        modules_file = path / "modules.json"
        if modules_file.is_file():
            modules = _read_json(modules_file)
            if not isinstance(modules, list):
                raise ValueError(f"{modules_file}: expected a JSON list of modules")
            for module in modules:
                kind = str(module.get("type", "")).rsplit(".", 1)[-1]
                if kind not in _MODULE_KINDS:
                    raise ValueError(
                        f"{modules_file}: module {module.get('type')!r} is not supported "
                        f"(only {', '.join(_MODULE_KINDS)}): its vectors would differ from sentence-transformers'"
                    )
                if kind == "Transformer" and module.get("path", ""):
                    raise ValueError(
                        f"{modules_file}: the Transformer module must be the folder itself, not {module['path']!r}"
                    )
                if kind == "Pooling":
                    pooling_dir = path / str(module.get("path", ""))
                elif kind == "Normalize":
                    normalize = True
        elif (path / "1_Pooling").is_dir():
            pooling_dir = path / "1_Pooling"

        mode: str = "mean"
        if pooling_dir is not None and (pooling_dir / "config.json").is_file():
            mode = cls._mode_from_pooling_config(_read_json(pooling_dir / "config.json"), pooling_dir)

        lengths = []
        if (path / "config.json").is_file():
            positions = model_max_positions(_read_json(path / "config.json"))
            if positions is not None:
                lengths.append(positions)
        declared = None
        sbert = path / "sentence_bert_config.json"
        if sbert.is_file():
            sbert_config = _read_json(sbert)
            if sbert_config.get("do_lower_case"):
                raise ValueError(f"{sbert}: do_lower_case is not supported")
            declared = sbert_config.get("max_seq_length")
        if not isinstance(declared, int) and (path / "tokenizer_config.json").is_file():
            declared = _read_json(path / "tokenizer_config.json").get("model_max_length")
        if isinstance(declared, int) and 0 < declared < _NO_TOKENIZER_LIMIT:
            lengths.append(declared)
        max_seq_length = min(lengths) if lengths else 512
        return cls(mode=mode, normalize=normalize, max_seq_length=max_seq_length)  # type: ignore[arg-type]

    @staticmethod
    def _mode_from_pooling_config(cfg: dict[str, Any], where: Path) -> str:
        if cfg.get("include_prompt") is False:  # Instructor-style: the prompt's tokens left out of the pooling
            raise ValueError(f"{where}: include_prompt false (pooling without the prompt's tokens) is not supported")
        named = cfg.get("pooling_mode")
        if isinstance(named, list) and len(named) == 1:  # 6.x writes one mode as itself, several as a list
            named = named[0]
        if isinstance(named, list):
            raise ValueError(f"{where}: concatenated pooling modes {named} are not supported")
        if isinstance(named, str):  # the newer single-key form
            mode = _POOLING_NAMES.get(named, named)
            if mode not in _POOLING_MODES:
                raise ValueError(f"{where}: unsupported pooling mode {named!r}")
            return mode
        unsupported = [k for k in _UNSUPPORTED_POOLING_FLAGS if cfg.get(k)]
        if unsupported:
            raise ValueError(f"{where}: unsupported pooling {unsupported}")
        modes = [mode for key, mode in _POOLING_FLAGS.items() if cfg.get(key)]
        if len(modes) > 1:
            raise ValueError(f"{where}: concatenated pooling modes {modes} are not supported")
        return modes[0] if modes else "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, config: PoolingConfig) -> torch.Tensor:
    """One vector per row of hidden [rows, seq, dim] (in float32), by config's mode over the positions the
    mask keeps (lengths: how many per row), L2-normalized where the checkpoint has a Normalize module."""
    hidden = hidden.float()
    mode = config.mode
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    elif mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "lasttoken":
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    else:  # max
        pooled = hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(dim=1)
    if config.normalize:
        pooled = F.normalize(pooled, p=2, dim=-1)
    return pooled
