"""A real `twinkle serve` (its own process, the bundled tiny model) and the few shims that point
tinker-cookbook 0.6.1's recipes at it: the model name, the renderer and the data paths.

* model name: the server's ``twinkle/tiny-qwen2``; its tokenizer is registered with the cookbook's own
  ``tokenizer_utils.register_tokenizer`` (the local directory, not the hub);
* renderer: ``role_colon`` (the cookbook's model table does not know the tiny model, so its entry is
  added to ``model_info.get_model_attributes``);
* data: the hub datasets a recipe loads by name are tiny local ones of the same columns
  (:data:`DATASETS`), served by a wrapper of ``datasets.load_dataset``; everything else in the
  recipes runs as shipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("tinker_cookbook")

MODEL = "twinkle/tiny-qwen2"
RENDERER = "role_colon"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``twinkle serve`` in a subprocess; yields ``{"url", "key"}`` (also set as TINKER_BASE_URL/TINKER_API_KEY)."""
    state = tmp_path_factory.mktemp("serve")
    twinkle = [str(Path(sys.executable).parent / "twinkle")]
    key = (
        subprocess.run(
            [*twinkle, "serve", "--state-dir", str(state), "--add-tenant", "cookbook", "--tenant-max-adapters", "64"],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    port = _free_port()
    log = open(state / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [*twinkle, "serve", "--state-dir", str(state), "--port", str(port), "--max-adapters", "64", "--threads", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600  # a loaded CI machine imports torch slowly
    while True:
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.close()
            raise RuntimeError("twinkle serve did not start:\n" + (state / "serve.log").read_text()[-4000:])
        time.sleep(0.5)
    os.environ["TINKER_BASE_URL"] = url
    os.environ["TINKER_API_KEY"] = key
    yield {"url": url, "key": key, "log": str(state / "serve.log")}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


# -- tiny local datasets, in the columns of the hub datasets the recipes name -----------------------
def _chat(i: int) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"Name a small number, please ({i})."},
        {"role": "assistant", "content": f"Here is one: {i % 7}."},
    ]


def _gsm8k(i: int) -> dict[str, str]:
    a, b = i % 5 + 1, i % 3 + 2
    return {"question": f"Tom has {a} apples and buys {b} more. How many apples?", "answer": f"{a} + {b}\n#### {a + b}"}


def _math(i: int) -> dict[str, str]:
    a, b = i % 4 + 1, i % 6 + 1
    return {"problem": f"What is {a} + {b}?", "answer": str(a + b), "solution": f"\\boxed{{{a + b}}}"}


def _hh(i: int) -> dict[str, str]:
    prompt = f"\n\nHuman: Say something kind ({i})."
    return {"chosen": prompt + "\n\nAssistant: You are doing well.", "rejected": prompt + "\n\nAssistant: No."}


def _deepmath(i: int) -> dict[str, Any]:
    a = i % 9 + 1
    return {"question": f"Compute {a} * 2.", "final_answer": str(2 * a), "difficulty": 1.0, "topic": "arithmetic"}


DATASETS: dict[str, Callable[[int], dict[str, Any]]] = {
    "HuggingFaceH4/no_robots": lambda i: {"messages": _chat(i), "prompt": _chat(i)[0]["content"], "category": "x"},
    "allenai/tulu-3-sft-mixture": lambda i: {"messages": _chat(i)},
    "openai/gsm8k": _gsm8k,
    "HuggingFaceH4/MATH-500": _math,
    "Anthropic/hh-rlhf": _hh,
    "zwhe99/DeepMath-103K": _deepmath,
}
ROWS = 64


def _local_dataset(name: str, split: str | None) -> Any:
    import datasets

    make = DATASETS[name]
    splits = {
        "train": datasets.Dataset.from_list([make(i) for i in range(ROWS)]),
        "test": datasets.Dataset.from_list([make(i) for i in range(ROWS, ROWS + 16)]),
    }
    if split is not None:
        return splits[split.split("[")[0]]
    return datasets.DatasetDict(splits)


@pytest.fixture(autouse=True)
def cookbook_shims(serve: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Model name, renderer and data paths (see the module docstring)."""
    import datasets
    from tinker_cookbook import model_info, tokenizer_utils
    from transformers import AutoTokenizer
    from twinkle_server.config import tiny_model_dir

    tokenizer_utils.register_tokenizer(MODEL, lambda: AutoTokenizer.from_pretrained(tiny_model_dir()))
    original_attributes = model_info.get_model_attributes

    def attributes(model_name: str) -> Any:
        if model_name.split(":", 1)[0] == MODEL:
            return model_info.ModelAttributes("twinkle", "0", "tiny", True, (RENDERER,))
        return original_attributes(model_name)

    monkeypatch.setattr(model_info, "get_model_attributes", attributes)
    original_load = datasets.load_dataset

    def load_dataset(path: str, *args: Any, split: str | None = None, **kwargs: Any) -> Any:
        if path in DATASETS:
            return _local_dataset(path, split)
        return original_load(path, *args, split=split, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for module in list(sys.modules.values()):
        if (
            getattr(module, "__name__", "").startswith("tinker_cookbook")
            and getattr(module, "load_dataset", None) is original_load
        ):
            monkeypatch.setattr(module, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)


def chat_jsonl(path: Path, rows: int = ROWS) -> Path:
    """A conversations file (``{"messages": [...]}`` per line), for recipes that take a data path."""
    import json

    path.write_text("".join(json.dumps({"messages": _chat(i)}) + "\n" for i in range(rows)))
    return path
