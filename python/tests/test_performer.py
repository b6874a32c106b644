"""The `performer` Python module against the runtime's command line and itself.

Needs the `performer` binary for the comparisons (`PERFORMER_BIN`, else the workspace's
target/release or target/debug build); scripts/test_python.sh builds it.
"""
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import performer

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "default_a"  # a tiny random byte-level model
SHIPPED = ROOT / "models" / "performer-byte"  # the trained byte-level model


def performer_bin():
    env = os.environ.get("PERFORMER_BIN")
    if env:
        return env
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "performer"
        if p.exists():
            return str(p)
    raise RuntimeError("no performer binary: set PERFORMER_BIN or cargo build -p performer-cli")


def cli(*args):
    out = subprocess.run([performer_bin(), *args], capture_output=True, check=True)
    return out.stdout


@pytest.fixture(scope="module")
def model():
    return performer.Model(str(FIXTURE))


@pytest.fixture(scope="module")
def shipped():
    return performer.Model(str(SHIPPED))


def test_info(model):
    info = model.info()
    assert info["num_tokens"] == 256 == model.vocab_size
    assert info["dim"] == 64 and info["depth"] == 2 and info["heads"] == 2
    assert info["tokenizer"] == "byte"
    assert info["causal"] is True
    assert info["parameters"] > 0 and info["state_bytes"] > 0
    assert info["file"].endswith("model.safetensors")
    assert sum(info["dtypes"].values()) > 0


def test_step_logits_equal_the_cli(model, tmp_path):
    tokens = [72, 101, 108, 108, 111, 32, 0, 255, 200, 10]
    out = tmp_path / "logits.npy"
    cli("logits", "--model", str(FIXTURE), "--tokens", ",".join(map(str, tokens)), "--out", str(out))
    expected = np.load(out)
    assert expected.shape == (len(tokens), 256) and expected.dtype == np.float32
    state = model.new_state()
    rows = [state.step(t) for t in tokens]
    for row in rows:
        assert isinstance(row, np.ndarray) and row.dtype == np.float32 and row.shape == (256,)
    # The same decode step in the same process-independent code: bit-identical.
    np.testing.assert_array_equal(np.stack(rows), expected)
    assert state.position == len(tokens)
    np.testing.assert_array_equal(state.logits, expected[-1])
    # prefill takes the chunked path (matrix products, another summation order): close, not
    # bit-equal; 1e-4 absolute at |logits| of a few units is float32 reassociation, not a bug.
    pre = model.new_state().prefill(tokens)
    np.testing.assert_allclose(pre, expected[-1], rtol=0, atol=1e-4)


def test_state_round_trip(model):
    state = model.new_state()
    state.prefill(list(b"The quick brown fox"))
    data = state.to_bytes()
    assert isinstance(data, bytes) and len(data) > 0
    restored = performer.State.from_bytes(model, data)
    assert restored.position == state.position
    np.testing.assert_array_equal(restored.logits, state.logits)
    for t in b" jumps":
        np.testing.assert_array_equal(restored.step(t), state.step(t))
    assert restored.to_bytes() == state.to_bytes()


def test_fork_is_independent(model):
    prompt = list(b"Once upon")
    state = model.new_state()
    state.prefill(prompt)
    fork = state.fork()
    a = state.step(ord("a"))
    b = fork.step(ord("b"))
    assert state.position == fork.position == len(prompt) + 1
    # Each equals a fresh state fed the same tokens: neither saw the other's step.
    for tok, got in ((ord("a"), a), (ord("b"), b)):
        fresh = model.new_state()
        fresh.prefill(prompt)
        np.testing.assert_array_equal(fresh.step(tok), got)
    assert not np.array_equal(a, b)
    state.reset()
    assert state.position == 0 and state.logits is None
    assert fork.position == len(prompt) + 1


def generate_cli(model_dir, prompt, *args):
    return cli("generate", "--model", str(model_dir), "--prompt", prompt, *args).decode()


def test_generate_greedy_equals_the_cli(shipped):
    expected = generate_cli(SHIPPED, "ROMEO:", "--max-tokens", "80", "--temperature", "0")
    pieces = list(shipped.generate("ROMEO:", max_tokens=80, temperature=0))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == expected
    assert len("".join(pieces)) > 40  # the shipped model writes text, not nothing


def test_generate_sampled_equals_the_cli(shipped):
    args = ["--max-tokens", "60", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9",
            "--repeat-penalty", "1.1", "--seed", "7", "--stop", "\n\n"]
    expected = generate_cli(SHIPPED, "KING:", *args)
    text = "".join(shipped.generate("KING:", max_tokens=60, temperature=0.9, top_k=20,
                                    top_p=0.9, repetition_penalty=1.1, seed=7, stop=["\n\n"]))
    assert text == expected
    # Token ids as the prompt: the same.
    again = "".join(shipped.generate(list(b"KING:"), max_tokens=60, temperature=0.9, top_k=20,
                                     top_p=0.9, repetition_penalty=1.1, seed=7, stop=["\n\n"]))
    assert again == text


def test_generate_continues_a_state(shipped):
    state = shipped.new_state()
    stream = shipped.generate("The sea", max_tokens=10, temperature=0, state=state)
    first = next(stream)
    # The state is lent to the running generation.
    with pytest.raises(performer.PerformerValueError, match="in use"):
        state.step(1)
    rest = "".join(stream)
    assert state.position == len(b"The sea") + 10
    # Greedy continuation from the state equals generating the whole text at once.
    more = "".join(shipped.generate("", max_tokens=10, temperature=0, state=state))
    whole = "".join(shipped.generate("The sea", max_tokens=20, temperature=0))
    assert first + rest + more == whole
    # Closing early gives the state back, holding what the pieces taken needed.
    state = shipped.new_state()
    stream = shipped.generate("The sea", max_tokens=50, temperature=0, state=state)
    next(stream)
    stream.close()
    assert state.position == len(b"The sea") + 1
    assert list(stream) == []


def test_errors_are_python_exceptions(model, tmp_path):
    with pytest.raises(performer.PerformerIOError) as e:
        performer.Model(str(tmp_path / "missing"))
    assert isinstance(e.value, OSError) and isinstance(e.value, performer.PerformerError)
    assert "model directory not found" in str(e.value)
    (tmp_path / "config.json").write_text('{"dimm": 3}')
    (tmp_path / "model.safetensors").write_bytes((FIXTURE / "model.safetensors").read_bytes())
    with pytest.raises(performer.PerformerValueError, match="unknown key `dimm`"):
        performer.Model(str(tmp_path))
    state = model.new_state()
    with pytest.raises(ValueError, match="token id 1000 is out of range for a vocabulary of 256"):
        state.step(1000)
    with pytest.raises(performer.PerformerValueError, match="empty input"):
        state.prefill([])
    with pytest.raises(ValueError, match="invalid state snapshot"):
        performer.State.from_bytes(model, b"not a snapshot")
    with pytest.raises(ValueError, match="temperature"):
        model.generate("x", temperature=-1.0)
    with pytest.raises(ValueError, match="stop"):
        model.generate("x", stop=[""])
    with pytest.raises(ValueError, match="empty"):
        model.generate("")
    with pytest.raises(TypeError):
        model.generate(3.5)
    with pytest.raises(OverflowError):
        state.step(-1)
    other = performer.Model(str(FIXTURE))
    with pytest.raises(ValueError, match="another Model"):
        other.generate("x", state=model.new_state())


def test_compute_releases_the_gil(shipped):
    # While one thread ingests a long prompt, another keeps running Python code: with the GIL
    # held for the whole prefill the counter could not advance during it.
    tokens = list(b"All the world's a stage, and all the men and women merely players. ") * 300
    done = threading.Event()
    started = threading.Event()

    def work():
        state = shipped.new_state()
        started.set()
        state.prefill(tokens)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    time.sleep(0.01)  # let the worker enter prefill
    count = 0
    while not done.is_set():
        count += 1
    t.join()
    assert count > 1000, count


def test_generate_json_schema(shipped):
    import json

    schema = json.loads((ROOT / "tests" / "fixtures" / "schemas" / "person.json").read_text())
    for seed in range(5):
        text = "".join(shipped.generate("Data: ", max_tokens=400, temperature=1.0, top_k=0,
                                        top_p=1.0, seed=seed, json_schema=schema))
        value = json.loads(text)
        assert set(value) == {"name", "age", "color"}, text
        assert isinstance(value["name"], str) and 1 <= len(value["name"]) <= 16, text
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 150, text
        assert value["color"] in ("red", "green", "blue"), text
    # A schema as JSON text, a Lark grammar and a regex.
    text = "".join(shipped.generate("x", seed=1, json_schema='{"type": "boolean"}'))
    assert text in ("true", "false"), text
    assert "".join(shipped.generate("Q: ", grammar='start: "yes" | "no"')) in ("yes", "no")
    text = "".join(shipped.generate("Id: ", regex="[0-9]{4}"))
    assert len(text) == 4 and text.isdigit(), text
    # Bad ones raise at the call, naming the problem.
    with pytest.raises(ValueError, match="unevaluatedProperties"):
        shipped.generate("x", json_schema={"type": "object", "unevaluatedProperties": False})
    with pytest.raises(ValueError, match="Lark"):
        shipped.generate("x", grammar="start: (")
    with pytest.raises(ValueError):
        shipped.generate("x", json_schema={"type": "string"}, regex="a")
