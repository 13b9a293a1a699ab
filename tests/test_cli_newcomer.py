"""The first minutes with Light-MoE: `make demo` writes varied text, bad arguments and a missing server
extra fail in one line with exit status 2 before any weights load."""
import re
import shlex
import sys
from pathlib import Path

import pytest

import light_moe
from light_moe.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_engine(monkeypatch):
    """Any attempt to load a model fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the engine was constructed")

    monkeypatch.setattr(light_moe, "LightMoEEngine", refuse)


def _demo_flags() -> list[str]:
    """The flags the Makefile's `demo` target passes to `light-moe generate` after the prompt."""
    text = (ROOT / "Makefile").read_text()
    line = re.search(r"^demo:.*\n\t(.*light-moe generate.*)$", text, re.M).group(1)
    variables = dict(re.findall(r"^(\w+) \?= (.*)$", text, re.M))
    line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
    return shlex.split(line.split("light-moe generate", 1)[1])[1:]  # after the prompt


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt_exits_2(prompt, no_engine, capsys):
    assert main(["generate", prompt, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "prompt is empty" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, name", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--top-k", "-5"], "top_k"),
])
def test_sampling_arguments_checked_before_the_weights_load(flags, name, no_engine, capsys):
    assert main(["generate", "def f():", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert name in err and len(err.strip().splitlines()) == 1


def test_serve_without_the_server_extra_says_how_to_install(monkeypatch, no_engine, capsys):
    import light_moe.server.serve as serve_mod

    monkeypatch.setitem(sys.modules, "fastapi", None)  # find_spec answers None: as if not installed
    monkeypatch.setattr(serve_mod, "serve", lambda args: pytest.fail("serve ran without the extra"))
    assert main(["serve", "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'light-moe[server]'" in err[0] and "fastapi" in err[0]


def test_serve_with_the_server_extra_runs_the_server(monkeypatch):
    import light_moe.server.serve as serve_mod

    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    seen = []
    monkeypatch.setattr(serve_mod, "serve", lambda args: seen.append(args.model) or 0)
    assert main(["serve", "--model", "some/dir"]) == 0
    assert seen == ["some/dir"]


def test_make_demo_samples():
    args = build_parser().parse_args(["generate", "x", *_demo_flags()])
    assert args.temperature > 0 and args.top_p <= 1 and args.repetition_penalty > 1


def _distinct_trigrams(text: str) -> float:
    words = text.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / max(len(grams), 1)


def test_make_demo_writes_varied_text():
    """Greedy decoding of the bundled model loops ("the string, and the string, ..."); the demo's sampling
    flags must not: most word trigrams of the output occur once."""
    from light_moe import LightMoEEngine, SamplingParams
    from light_moe.assets import DEMO_MODEL_DIR

    args = build_parser().parse_args(["generate", "def fibonacci(n):", *_demo_flags()])
    engine = LightMoEEngine(DEMO_MODEL_DIR, device="cpu", show_progress=False)
    try:
        def text(**sampling):
            return engine.generate_outputs("def fibonacci(n):", SamplingParams(max_tokens=96, **sampling))[0].text

        greedy = text(temperature=0.0)
        demo = text(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)
    finally:
        engine.shutdown()
    assert _distinct_trigrams(greedy) < 0.7, greedy  # the loop the demo used to print
    assert _distinct_trigrams(demo) > 0.9, demo
