"""Real tokenizers and official chat templates for the tests, from a pinned PyPI package.

    python tests/real_artefacts.py          # `make real-artefacts` (called by `make test`)

The source distribution of llama-cpp-python carries llama.cpp's vocabulary-only GGUF files of
released models' tokenizers (with test strings and the token ids llama.cpp expects) and the
official Jinja chat templates of many released models. This script downloads the pinned
sdist once into an ignored cache (`.cache/real_artefacts/`), checks its sha256, extracts only
those files, converts each tokenizer transformers can read (`gguf_file=`) into a saved
tokenizer folder (loading a GGUF takes 6-21 s; a saved folder under one), and checks every
converted tokenizer against llama.cpp's expected ids. Tests use only the tokenizers that
reproduce every expected id list (`validation.json` says which and why the others do not).
The same sdist carries llama.cpp's own HF -> GGUF converter (`convert_hf_to_gguf.py`, the
`conversion/` package it imports and its matching `gguf-py/`): extracted into
`.cache/real_artefacts/llama_cpp/`, it is what `chatglm_lora/export_gguf.py` runs.
Nothing of this is committed; a rerun extracts only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "real_artefacts"
SDIST = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
MODELS = CACHE / "models"  # ggml-vocab-*.gguf (+ .inp / .out)
TEMPLATES = CACHE / "templates"  # <model>.jinja
TOKENIZERS = CACHE / "tokenizers"  # saved tokenizer folders, one per GGUF vocabulary
VALIDATION = CACHE / "validation.json"
LLAMA_CPP = CACHE / "llama_cpp"  # llama.cpp's converter, laid out as in llama.cpp's tree
# What convert_hf_to_gguf.py needs from llama.cpp's tree: its model classes (conversion/), its own gguf
# package (gguf-py/, newer than the one on PyPI), the templates a few model classes fill in (models/templates/);
# the requirements files and the licence travel along for the user to read.
CONVERTER_FILES = ("convert_hf_to_gguf.py", "LICENSE", "gguf-py/pyproject.toml", "gguf-py/LICENSE",
                   "requirements/requirements-convert_hf_to_gguf.txt",
                   "requirements/requirements-convert_legacy_llama.txt")
CONVERTER_FOLDERS = ("conversion/", "gguf-py/gguf/", "models/templates/")

# The vocabularies of the model families our recipes tune (gpt-neox and baichuan: transformers'
# GGUF loader refuses their architectures; recorded as such).
VOCABS = ["qwen2", "llama-bpe", "deepseek-llm", "llama-spm", "falcon", "gpt-neox", "baichuan"]
SEPARATOR = "\n__ggml_vocab_test__\n"


def download() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    if not SDIST.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary=:all:",
                        f"{PACKAGE}=={VERSION}", "-d", str(CACHE)], check=True)
    digest = hashlib.sha256(SDIST.read_bytes()).hexdigest()
    if digest != SHA256:
        SDIST.unlink()
        raise SystemExit(f"{SDIST.name}: sha256 {digest}, expected {SHA256}: deleted, not used")


def extract() -> None:
    root = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(SDIST) as tar:
        for member in tar:
            if not member.isfile() or not member.name.startswith(root):
                continue
            rest = member.name[len(root):]
            if rest.startswith("models/ggml-vocab-") and rest.count("/") == 1:
                _extract(tar, member, MODELS / rest[len("models/"):])
            elif rest.startswith("models/templates/") and rest.endswith(".jinja"):
                _extract(tar, member, TEMPLATES / rest[len("models/templates/"):])
            if rest in CONVERTER_FILES or rest.startswith(CONVERTER_FOLDERS):
                _extract(tar, member, LLAMA_CPP / rest)


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    if target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")  # an interrupted run leaves no truncated file behind
    with tar.extractfile(member) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst)
    partial.replace(target)


def expected_cases(vocab: str) -> list[tuple[str, list[int]]]:
    inp, out = MODELS / f"ggml-vocab-{vocab}.gguf.inp", MODELS / f"ggml-vocab-{vocab}.gguf.out"
    if not inp.is_file() or not out.is_file():
        return []
    texts = inp.read_text(encoding="utf-8").split(SEPARATOR)[:-1]  # each test string ends with the separator
    ids = [[int(x) for x in line.split()] for line in out.read_text(encoding="utf-8").split("\n")[:len(texts)]]
    return list(zip(texts, ids))


def convert_and_validate() -> dict:
    from transformers import AutoTokenizer

    results = json.loads(VALIDATION.read_text()) if VALIDATION.is_file() else {}
    for vocab in VOCABS:
        folder = TOKENIZERS / vocab
        if vocab in results and (folder.is_dir() or not results[vocab]["loaded"]):
            continue
        print(f"converting ggml-vocab-{vocab}.gguf", flush=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(MODELS, gguf_file=f"ggml-vocab-{vocab}.gguf")
        except Exception as err:  # the loader refuses some architectures
            results[vocab] = {"loaded": False, "usable": False, "why": f"{type(err).__name__}: {err}"[:200]}
            continue
        tokenizer.save_pretrained(folder)
        cases = expected_cases(vocab)
        failed = [text for text, ids in cases if tokenizer(text, add_special_tokens=False)["input_ids"] != ids]
        results[vocab] = {
            "loaded": True, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "cases": len(cases), "matching": len(cases) - len(failed), "failing_examples": failed[:3],
            "usable": bool(cases) and not failed,  # the tests use only exact tokenizers
        }
        VALIDATION.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    VALIDATION.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    return results


# ---------------------------------------------------------------- for the tests
def available() -> bool:
    return VALIDATION.is_file() and TEMPLATES.is_dir()


def tokenizer_dir(vocab: str) -> Path | None:
    """The saved tokenizer folder of a validated vocabulary, None if it is not usable."""
    if not available():
        return None
    result = json.loads(VALIDATION.read_text()).get(vocab, {})
    return TOKENIZERS / vocab if result.get("usable") else None


def official_template(model: str) -> str:
    return (TEMPLATES / f"{model}.jinja").read_text(encoding="utf-8")


def converter_dir() -> Path | None:
    """The extracted llama.cpp tree holding convert_hf_to_gguf.py, None before `make real-artefacts`."""
    return LLAMA_CPP if (LLAMA_CPP / "convert_hf_to_gguf.py").is_file() else None


def main() -> None:
    download()
    extract()
    results = convert_and_validate()
    print(f"llama.cpp's HF -> GGUF converter: {LLAMA_CPP / 'convert_hf_to_gguf.py'}")
    for vocab, result in results.items():
        if result["loaded"]:
            print(f"{vocab}: {result['matching']}/{result['cases']} of llama.cpp's id lists reproduced "
                  f"({'used' if result['usable'] else 'not used'} by the tests)")
        else:
            print(f"{vocab}: not loadable ({result['why'][:100]})")


if __name__ == "__main__":
    main()
