"""Real Llama 3 and Mistral v0.3 tokenizers built offline from files shipped on PyPI.

The Hugging Face hub is unreachable from CI and from many cluster nodes, but the *tokenizers* of
two of the paper's families ship inside ordinary PyPI packages:

* Llama 3 / 3.1: ``llama_models/llama3/tokenizer.model`` in ``llama-models`` (Meta's tiktoken BPE
  file, 128 000 ranks) plus 256 special tokens whose names and ids Meta's own
  ``llama_models.llama3.tokenizer.Tokenizer`` defines (``<|begin_of_text|>`` = 128000,
  ``<|end_of_text|>`` = 128001, ``<|finetune_right_pad_id|>`` = 128004, ``<|eom_id|>`` = 128008,
  ``<|eot_id|>`` = 128009, ...);
* Mistral 7B v0.3: ``mistral_common/data/mistral_instruct_tokenizer_240323.model.v3`` in
  ``mistral-common`` (the v3 SentencePiece model, vocabulary 32768, control tokens ``[INST]`` = 3,
  ``[/INST]`` = 4, ...).

This module turns each into a Hugging Face tokenizer folder (``tokenizer.json`` +
``tokenizer_config.json``) laid out like the hub's, cached under ``<cache_dir>/tokenizers/``, so
that tests and tiny models load them with ``AutoTokenizer.from_pretrained`` exactly as they would
load ``meta-llama/Llama-3.1-8B-Instruct`` or ``mistralai/Mistral-7B-Instruct-v0.3``. Building takes
~3 s each on one core; later calls return the cached folder.

The conversion mirrors what the hub's ``tokenizer.json`` files contain: for Llama 3, a byte-level
BPE with Meta's split regex, ``ignore_merges`` and a post-processor that prepends
``<|begin_of_text|>``; for Mistral, the SentencePiece model converted by transformers' own
``LlamaTokenizer`` (Metaspace pre-tokenizer, byte fallback, ``<s>`` prepended, ``legacy=False``).
``tests/test_families.py`` checks both against the reference encoders (``llama_models``'
``ChatFormat``/``Tokenizer`` and ``mistral_common``'s ``MistralTokenizer``) token for token.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from dft import DftError

LLAMA3_PACKAGE = "llama_models"
LLAMA3_FILE = ("llama3", "tokenizer.model")
MISTRAL_PACKAGE = "mistral_common"
MISTRAL_V3_FILE = ("data", "mistral_instruct_tokenizer_240323.model.v3")

#: Meta's pre-tokenisation regex for Llama 3 (``llama_models.llama3.tokenizer.Tokenizer.pat_str``).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: The 12 named special tokens of Llama 3.1, in id order from 128000; the rest of the 256 are
#: ``<|reserved_special_token_{2..247}|>`` (same construction as ``llama_models``).
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_NUM_SPECIAL = 256
LLAMA3_MAX_LENGTH = 131072
#: Build recipe version: bump when the conversion changes so cached folders are rebuilt.
_RECIPE = "1"


def _package_file(package: str, parts: tuple[str, ...], pip_name: str) -> Path:
    """Locate a data file inside an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DftError(f"the offline tokenizer needs the PyPI package {pip_name}: pip install {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise DftError(f"{pip_name} is installed but {path} is missing (a different version?); reinstall {pip_name}")
    return path


def llama3_tokenizer_file() -> Path:
    """Meta's Llama 3 tiktoken file shipped in ``llama-models``."""
    return _package_file(LLAMA3_PACKAGE, LLAMA3_FILE, "llama-models")


def mistral_v3_tokenizer_file() -> Path:
    """Mistral's v3 SentencePiece model (Mistral 7B v0.3) shipped in ``mistral-common``."""
    return _package_file(MISTRAL_PACKAGE, MISTRAL_V3_FILE, "mistral-common")


def llama3_special_tokens() -> list[str]:
    """All 256 special tokens of Llama 3.1 in id order (ids 128000..128255)."""
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(LLAMA3_SPECIAL))]
    return LLAMA3_SPECIAL + reserved


def _key(path: Path, *extra: str) -> str:
    st = path.stat()
    return hashlib.sha256(":".join([path.name, str(st.st_size), _RECIPE, *extra]).encode()).hexdigest()[:12]


def _build_atomically(out: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and rename the result to ``out`` (once, under a file lock)."""
    from dft.locks import file_lock

    if (out / "tokenizer_config.json").exists():
        return out
    with file_lock(out.with_suffix(".lock")):
        if (out / "tokenizer_config.json").exists():
            return out
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        os.replace(tmp, out)
    return out


def llama3_tokenizer_dir(cache_dir: str | os.PathLike, *, instruct: bool = True) -> Path:
    """A HF tokenizer folder equivalent to Llama 3.1 8B's (``-Instruct`` when ``instruct``).

    The two differ only in ``eos_token``: ``<|eot_id|>`` for Instruct, ``<|end_of_text|>`` for
    the base model, as on the hub. No chat template is written: dft sets it from the model config
    (see :mod:`dft.families`).
    """
    src = llama3_tokenizer_file()
    variant = "instruct" if instruct else "base"
    out = Path(cache_dir).expanduser() / "tokenizers" / f"llama3_1-{variant}-{_key(src, variant)}"

    def build(tmp: Path) -> None:
        from tokenizers import processors
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter

        special = llama3_special_tokens()
        tk = TikTokenConverter(vocab_file=str(src), pattern=LLAMA3_PATTERN, extra_special_tokens=special).converted()
        n_base = tk.get_vocab_size() - len(special)
        if n_base != 128000 or tk.token_to_id("<|begin_of_text|>") != 128000:
            raise DftError(f"unexpected Llama 3 vocabulary in {src}: {n_base} base tokens")
        bos = "<|begin_of_text|>"
        tk.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, 128000)]
                ),
            ]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tk,
            bos_token=bos,
            eos_token="<|eot_id|>" if instruct else "<|end_of_text|>",
            clean_up_tokenization_spaces=False,  # transformers 5 ignores True for BPE (hub file says true)
            model_max_length=LLAMA3_MAX_LENGTH,
            model_input_names=["input_ids", "attention_mask"],
        )
        fast.save_pretrained(tmp)
        _write_provenance(tmp, src, "llama-models")

    return _build_atomically(out, build)


def mistral_v3_tokenizer_dir(cache_dir: str | os.PathLike) -> Path:
    """A HF tokenizer folder equivalent to Mistral 7B v0.3's (base and Instruct share it)."""
    src = mistral_v3_tokenizer_file()
    out = Path(cache_dir).expanduser() / "tokenizers" / f"mistral_v0_3-{_key(src)}"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        stage = tmp / "_sp"
        stage.mkdir()
        shutil.copyfile(src, stage / "tokenizer.model")
        (stage / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "legacy": False,
                    "add_prefix_space": True,
                    "spaces_between_special_tokens": False,
                    "clean_up_tokenization_spaces": False,
                }
            )
        )
        tok = AutoTokenizer.from_pretrained(stage)  # SentencePiece -> tokenizers conversion
        if len(tok) != 32768 or tok.convert_tokens_to_ids("[INST]") != 3:
            raise DftError(f"unexpected Mistral v3 vocabulary in {src}: {len(tok)} tokens")
        tok.save_pretrained(tmp)
        shutil.copyfile(src, tmp / "tokenizer.model")
        shutil.rmtree(stage)
        _write_provenance(tmp, src, "mistral-common")

    return _build_atomically(out, build)


def _write_provenance(folder: Path, src: Path, package: str) -> None:
    from importlib.metadata import version

    (folder / "dft_provenance.json").write_text(
        json.dumps({"source_file": src.name, "package": package, "package_version": version(package)}, indent=1)
    )


def load_llama3_tokenizer(cache_dir: str | os.PathLike, *, instruct: bool = True):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir(cache_dir, instruct=instruct))


def load_mistral_v3_tokenizer(cache_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(mistral_v3_tokenizer_dir(cache_dir))
