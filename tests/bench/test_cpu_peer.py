"""bench cpu-peer: usage errors before any work, the converter wrapper (on a stand-in converter), and,
where llama-cpp-python and llama.cpp's converter are installed, a tiny end-to-end run whose greedy
tokens must equal llama.cpp's."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap

import pytest

from moe_runtime.bench import cpu_peer_convert
from moe_runtime.bench.cpu_peer import CpuPeerSettings, bench_cpu_peer, format_table
from moe_runtime.cli import main
from moe_runtime.errors import UsageError


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_llama_cpp_python_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # find_spec answers None: not installed
    code, out, err = run_cli(capsys, "bench", "cpu-peer", "--hidden", "64", "--layers", "2")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'moe-runtime[peer]'" in lines[0], err
    assert out == ""


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--thread-counts", "1,x"], "--thread-counts"),
        (["--thread-counts", "0,2"], "--thread-counts"),
        (["--hidden", "0"], "--hidden"),
        (["--hidden", "100"], "--hidden"),
        (["--layers", "0"], "--layers"),
        (["--new-tokens", "0"], "--new-tokens"),
        (["--expert-budget", "2GB"], "--expert-budget"),
        (["--expert-budget", "150%"], "--expert-budget"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(capsys, monkeypatch, flags, named):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # refused for the flag, not for the install
    code, _, err = run_cli(capsys, "bench", "cpu-peer", *flags)
    assert code == 2 and named in err and "pip install" not in err, err


def test_a_named_converter_must_exist(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="--converter .*no such file"):
        cpu_peer_convert.find_converter(tmp_path / "convert_hf_to_gguf.py")
    monkeypatch.setenv(cpu_peer_convert.CONVERTER_ENV, str(tmp_path / "nowhere.py"))
    with pytest.raises(UsageError, match="LLAMA_CPP_CONVERTER .*no such file"):
        cpu_peer_convert.find_converter()


def test_no_converter_found_says_how_to_get_one(tmp_path, monkeypatch):
    for name in (cpu_peer_convert.CONVERTER_ENV, cpu_peer_convert.LLAMA_CPP_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError, match="convert_hf_to_gguf.py was not found: pass --converter"):
        cpu_peer_convert.find_converter()
    folder = tmp_path / "llama.cpp"
    (folder / "gguf-py").mkdir(parents=True)
    (folder / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(UsageError, match="needs sentencepiece"):  # found, but its imports are missing
        cpu_peer_convert.find_converter()
    monkeypatch.setitem(sys.modules, "sentencepiece", json)  # any module: found
    assert cpu_peer_convert.find_converter() == (folder / "convert_hf_to_gguf.py").resolve()


def _stand_in_converter(folder):
    """A converter laid out as llama.cpp's (a script + the ``conversion`` package holding the
    pre-tokenizer lookup): it writes the pre-tokenizer name it gets for the checkpoint's tokenizer."""
    (folder / "conversion").mkdir(parents=True)
    (folder / "conversion" / "__init__.py").write_text(
        textwrap.dedent(
            """
            class TextModel:
                def get_vocab_base_pre(self, tokenizer):
                    if tokenizer == "known":
                        return "llama-bpe"
                    raise NotImplementedError("BPE pre-tokenizer was not recognized")
            """
        )
    )
    (folder / "convert_hf_to_gguf.py").write_text(
        textwrap.dedent(
            """
            import argparse
            from pathlib import Path
            from conversion import TextModel

            def main():
                parser = argparse.ArgumentParser()
                parser.add_argument("model")
                parser.add_argument("--outfile")
                parser.add_argument("--outtype")
                args = parser.parse_args()
                tokenizer = (Path(args.model) / "tokenizer").read_text()
                if tokenizer == "broken":
                    raise SystemExit("cannot convert")
                name = TextModel().get_vocab_base_pre(tokenizer)
                Path(args.outfile).write_text(f"{args.outtype} {name}")

            if __name__ == "__main__":
                main()
            """
        )
    )
    return folder / "convert_hf_to_gguf.py"


@pytest.mark.parametrize(("tokenizer", "named"), [("demo", "refact"), ("known", "llama-bpe")])
def test_wrapper_names_only_an_unrecognized_pre_tokenizer(tmp_path, tokenizer, named):
    converter = _stand_in_converter(tmp_path / "llama.cpp")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer").write_text(tokenizer)
    out = cpu_peer_convert.convert_to_gguf(ckpt, tmp_path / "m.gguf", converter)
    assert out.read_text() == f"f32 {named}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "llama.cpp", "m.gguf"]


def test_a_failed_conversion_raises_and_leaves_nothing(tmp_path):
    converter = _stand_in_converter(tmp_path / "llama.cpp")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer").write_text("broken")
    with pytest.raises(RuntimeError, match="cannot convert"):
        cpu_peer_convert.convert_to_gguf(ckpt, tmp_path / "m.gguf", converter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "llama.cpp"]


TINY = {"hidden_size": 64, "num_hidden_layers": 2}


@pytest.fixture(scope="module")
def converter():
    """llama.cpp's converter where one is set up ($LLAMA_CPP_CONVERTER, ...), else the test skips."""
    try:
        return cpu_peer_convert.find_converter()
    except UsageError as exc:
        pytest.skip(f"llama.cpp's converter: {exc}")


@pytest.fixture(scope="module")
def tiny_checkpoint(converter, tmp_path_factory):
    from moe_runtime.bench.cpu_peer import _MODULE, _Job
    from moe_runtime.bench.memory import run_child

    work = tmp_path_factory.mktemp("cpu-peer")
    ckpt = work / "hf"
    run_child(_MODULE, "cpu-peer", "build", ckpt, _Job(CpuPeerSettings(**TINY).model_overrides()), work)
    return ckpt


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed")
def test_real_converter_writes_refact_into_the_gguf(tmp_path, converter, tiny_checkpoint):
    import gguf

    out = cpu_peer_convert.convert_to_gguf(tiny_checkpoint, tmp_path / "tiny.gguf", converter)
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == "refact"
    assert fields["general.file_type"].contents() == 0  # all float32
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert fields["llama.expert_count"].contents() == config["num_local_experts"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_tiny_end_to_end_tokens_equal_llama_cpp(tmp_path, converter):
    settings = CpuPeerSettings(**TINY, new_tokens=8, repeats=1, threads=(1,))
    result = bench_cpu_peer(settings, converter, cache_dir=tmp_path, progress=False)
    row = result["threads"]["1"]
    assert result["pre_tokenizer"] == "refact"
    assert result["tokenization_checked_texts"] > settings.prompts
    assert all(20 <= n <= 30 for n in result["prompt_tokens"]) and len(result["prompt_tokens"]) == 4
    for system in ("resident", "offload"):
        assert row[system]["tokens_identical"], (system, row[system]["token_match_rate"])
        assert row[system]["token_match_rate"] == 1.0
        for ratio in ("decode", "prefill", "peak_rss", "load"):
            assert row[system]["vs_llama_cpp"][ratio] > 0
        assert row[system]["peak_rss_vs_weights"] == pytest.approx(
            row[system]["peak_rss_bytes"] / result["model"]["bytes"]
        )
    assert row["llama.cpp"]["runs"][0]["threads"] == 1
    assert all(len(t) == 8 for t in result["reference_tokens"])
    table = format_table(result)
    assert "decode tok/s" in table and "llama.cpp" in table and "RSS / weights" in table
    assert os.path.exists(result["gguf"])
