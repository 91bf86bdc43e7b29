"""`save_pretrained` / `from_pretrained`: ossgpt's own checkpoint format and Hugging Face's gpt-oss format.

ossgpt format                          Hugging Face format
  config.json  {"format": "ossgpt",      config.json  {"model_type": "gpt_oss", ...HF field names}
                "config": {...}}
  model.safetensors  (our names)         model.safetensors or model-0000i-of-0000N.safetensors + index
                                          (names with a `model.` prefix; lm_head.weight without)

The model's parameter names are HF's minus the `model.` prefix, so converting is renaming. Loading builds
the model on the `meta` device (no memory, no init), then materialises each tensor straight from the
memory-mapped file in the requested dtype and device, checking every name and shape: a foreign, truncated
or mismatched checkpoint fails with the file and tensor named, never a silent partial load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ossgpt.checkpoint.files import atomic_directory, iter_tensors, read_json, safetensors_files
from ossgpt.checkpoint.hf_config import config_from_hf, config_to_hf
from ossgpt.config import GPTOSSConfig
from ossgpt.errors import UserError
from ossgpt.model.model import GPTOSSForCausalLM
from ossgpt.model.rope import RotaryEmbedding

FORMAT_NAME = "ossgpt"
FORMAT_VERSION = 1
HF_PREFIX = "model."


def hf_to_ours(name: str) -> str:
    return name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else name


def ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else HF_PREFIX + name


def detect_format(directory: Path) -> tuple[str, dict]:
    """('ossgpt' | 'hf', config dict) for a checkpoint directory, or a UserError saying what it is not."""
    if not directory.is_dir():
        raise UserError(f"checkpoint directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.exists():
        raise UserError(f"{directory} has no config.json: not an ossgpt or Hugging Face gpt-oss checkpoint")
    raw = read_json(config_path)
    if raw.get("format") == FORMAT_NAME:
        return "ossgpt", raw
    if raw.get("model_type") == "gpt_oss":
        return "hf", raw
    kind = raw.get("model_type") or raw.get("format") or "unknown"
    raise UserError(f"{config_path} describes a {kind!r} model; ossgpt loads ossgpt and gpt_oss checkpoints only")


def load_config(directory: str | Path, **overrides) -> GPTOSSConfig:
    """The model config of a checkpoint directory of either format."""
    fmt, raw = detect_format(Path(directory))
    if fmt == "hf":
        return config_from_hf(raw, **overrides)
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{directory} was written by a newer ossgpt (format {raw['format_version']}); upgrade ossgpt")
    try:
        return GPTOSSConfig.from_dict({**raw["config"], **overrides})
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{directory}/config.json is not a valid ossgpt config: {err}") from None


def from_pretrained(
    directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **config_overrides
) -> GPTOSSForCausalLM:
    """Load a model from an ossgpt or Hugging Face gpt-oss checkpoint directory.

    config_overrides change non-shape fields at load time (e.g. attn_implementation="eager").
    """
    directory = Path(directory)
    fmt, _ = detect_format(directory)
    config = load_config(directory, **config_overrides)
    rename = hf_to_ours if fmt == "hf" else (lambda name: name)
    with torch.device("meta"):
        model = GPTOSSForCausalLM(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")

    loaded = {}
    for name, path, tensor in iter_tensors(safetensors_files(directory)):
        ours = rename(name)
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the head
        if ours not in expected:
            raise UserError(f"{path.name}: unexpected tensor {name!r}; this checkpoint does not match its config.json")
        if tuple(tensor.shape) != tuple(expected[ours]):
            raise UserError(
                f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[ours])}"
            )
        loaded[ours] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{directory}: checkpoint is missing tensor(s) {', '.join(missing[:3])}{more}")

    model.load_state_dict(loaded, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary_emb = RotaryEmbedding(config).to(device)  # non-persistent buffers were left on `meta`
    return model.eval()


def save_pretrained(model: GPTOSSForCausalLM, directory: str | Path, format: str = "ossgpt") -> None:  # noqa: A002
    """Write config.json + model.safetensors atomically. format: "ossgpt" or "hf" (loadable by transformers)."""
    if format not in ("ossgpt", "hf"):
        raise ValueError(f"format must be 'ossgpt' or 'hf', got {format!r}")
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # safetensors cannot store two names for one tensor; the tie is in the config
    if format == "hf":
        state = {ours_to_hf(name): t for name, t in state.items()}
        config = config_to_hf(model.config)
        config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    else:
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    with atomic_directory(Path(directory)) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
