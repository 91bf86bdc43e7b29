"""The package's layout, checked: imports flow one way, from the lesson (model/) up to the command line.

    kernels     the speed: functions of tensors, importing nothing from ossgpt
    model       what GPT-OSS computes (imports kernels, config, options only)
    quant, lora model transforms, applied from outside (quantized weights; low-rank adapters)
    checkpoint  loading and saving
    inference, eval
    chat        Harmony and OpenAI-format conversations, chat sessions
    training    pretraining and supervised fine-tuning (SFT conversations rendered by chat)
    serve       the OpenAI-compatible HTTP server (inference + chat)
    api         GPTOSSForCausalLM: the model with loading, saving and generation as methods
    cli         the command line

A module may import from its own package and from lower layers only; every `ossgpt` import counts, including the
ones inside functions.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ossgpt"

LAYERS = [
    {"errors", "atomic", "presets", "options"},
    {"config", "devices", "tokenizer", "kernels"},
    {"model", "data"},
    {"quant", "lora"},
    {"checkpoint"},
    {"inference", "eval"},
    {"chat"},
    {"training"},
    {"serve"},
    {"api"},
    {"cli"},
    {"__main__", "__init__"},  # `python -m ossgpt`, and the package's public names
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def part_of(module: str) -> str:
    """ossgpt.model.moe -> "model"; ossgpt.config -> "config"; ossgpt itself -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    return ".".join(("ossgpt", *path.relative_to(SRC).with_suffix("").parts))


def ossgpt_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported ossgpt module) for every import in a source file. `from ossgpt import __version__` is the
    version string, not the package's API, and is left out."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "ossgpt"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ossgpt":
            if node.module == "ossgpt" and [alias.name for alias in node.names] == ["__version__"]:
                continue
            found.append((node.lineno, node.module))
    return found


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {part_of(module_name(path)) for path in SOURCES}
    assert parts <= set(LAYER_OF), f"add {sorted(parts - set(LAYER_OF))} to LAYERS"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path):
    own = part_of(module_name(path))
    upward = [
        f"line {line}: {module}"
        for line, module in ossgpt_imports(path)
        if part_of(module) != own and LAYER_OF[part_of(module)] >= LAYER_OF[own]
    ]
    assert not upward, f"{own} (layer {LAYER_OF[own]}) imports from its layer or above: {upward}"


def test_kernels_import_nothing_of_ossgpt():
    for path in (SRC / "kernels").glob("*.py"):
        assert [m for _, m in ossgpt_imports(path) if part_of(m) != "kernels"] == [], path.name


def test_the_model_never_imports_torch_distributed():
    """Parallelism is applied from outside (ossgpt.training.distributed)."""
    for path in [*(SRC / "model").glob("*.py"), *(SRC / "kernels").glob("*.py")]:
        assert "torch.distributed" not in path.read_text(), path.name
