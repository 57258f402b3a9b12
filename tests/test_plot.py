"""plot.py: a panel for the loss and one for each other metric a run logs, and a missing loss.png
drawn again by rerunning a finished run."""

import json

import pytest

from llm_machinery import plot
import train


def test_every_metric_gets_a_panel_and_per_question_accuracies_share_one():
    """Lines are labelled training or validation; a metric that never changes gets no panel but its value."""
    records = [
        {"step": 10, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 900.0, "mfu": None, "time": 3.0, "cv": 0.4,
         "load_l0_e1": 0.2, "dropped": 0.0},
        {"step": 10, "val_loss": 5.2, "val_bpb": 2.1, "val_accuracy": 0.5, "val_accuracy_color": 0.75},
        {"step": 20, "loss": 4.0, "lr": 1e-3, "cv": 0.3, "dropped": 0.0},
    ]
    assert plot.panels(records) == ({
        "loss": {"training": [(10, 5.0), (20, 4.0)], "validation": [(10, 5.2)]},
        "cv": {"training": [(10, 0.4), (20, 0.3)]},
        "bpb": {"validation": [(10, 2.1)]},
        "accuracy": {"validation": [(10, 0.5)], "validation: color": [(10, 0.75)]},
    }, {"dropped": 0.0})


def test_every_panel_is_named_in_words_with_its_unit():
    """The titles of the metrics every model file and pipeline logs come in words, with a unit: the model
    file's METRICS first (siglip's validation accuracy is zero-shot), then the evaluations'."""
    import moe
    import siglip

    for name in ("cv", "maxvio", "dead", "dropped", "aux_loss", "z_loss"):
        title, unit = plot.described(name, moe.METRICS)
        assert " " in title and unit, name
    assert plot.described("cv", moe.METRICS)[0] == "coefficient of variation of expert load"
    assert plot.described("accuracy", siglip.METRICS)[0].startswith("zero-shot")
    assert plot.described("acc", siglip.METRICS)[0] != plot.described("accuracy", siglip.METRICS)[0]
    for name in ("loss", "ppl", "bpb", "accuracy"):
        assert plot.described(name, {})[1], name


def test_a_finished_run_rerun_draws_its_missing_plot(corpus_env, capsys):
    pytest.importorskip("matplotlib")
    out = corpus_env / "plotless"
    argv = ["--data", str(corpus_env / "corpus.txt"), "--out", str(out), "--vocab-size", "300", "--set", "dim=32",
            "--set", "n_layers=1", "--set", "n_heads=2", "--set", "n_kv_heads=1", "--set", "ffn_dim=64",
            "--set", "max_seq_len=32", "--batch-size", "4", "--max-steps", "4", "--eval-every", "2",
            "--eval-tokens", "256", "--sample-tokens", "0", "--threads", "1"]
    assert train.main([*argv, "--no-plot"]) == 0
    assert not (out / "loss.png").exists()
    metrics = (out / "metrics.jsonl").read_text()
    assert train.main(argv) == 0
    assert "already holds a finished run" in capsys.readouterr().out
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "metrics.jsonl").read_text() == metrics  # drawn, not trained again
    assert json.loads(metrics.splitlines()[-1])["step"] == 4


def test_plot_draws_a_run_again_and_names_a_missing_folder(corpus_env, tmp_path, capsys):
    """train.py --plot RUN draws RUN/loss.png again and trains nothing; a folder that is not there, or holds
    no run, is said in one sentence."""
    pytest.importorskip("matplotlib")
    out = corpus_env / "plotless"
    if not (out / "metrics.jsonl").exists():
        test_a_finished_run_rerun_draws_its_missing_plot(corpus_env, capsys)
    (out / "loss.png").unlink()
    metrics = (out / "metrics.jsonl").read_text()
    assert train.main(["--plot", str(out)]) == 0
    assert capsys.readouterr().out == f"loss curve in {out / 'loss.png'}\n"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and (out / "metrics.jsonl").read_text() == metrics
    assert train.main(["--plot", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'} does not exist; give a folder that train.py wrote, such as out/gpt_llama\n"
    assert train.main(["--plot", str(tmp_path)]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    for given, said in ((str(tmp_path / "a_file"), "a_file is not a folder;"), ("", "--plot must name a run folder")):
        assert train.main(["--plot", given]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.splitlines()) == 1, err


def test_examples_go_where_asked_and_an_unwritable_folder_is_said(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for given, said in ((str(tmp_path / "a_file" / "ex"), "cannot write the examples into"),
                        ("", "--examples must name a folder")):
        assert train.main(["--examples", given]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
