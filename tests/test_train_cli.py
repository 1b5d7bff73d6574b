"""`spamfilterd-train` end to end on tiny models: outputs, determinism, evaluate, other data sources."""

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from spamfilterd.classifier import SpamClassifier
from spamfilterd.scores import Thresholds
from tests.helpers import make_email_corpus, make_mail
from trainer.cli import main
from trainer.data import DataOptions, build_splits
from trainer.train import RECIPES, TrainConfig, score_texts, train

# One member: the recipe's ensemble would triple every run; test_members_* trains one.
TINY = ["--arch", "gpt-tiny", "--epochs", "2", "--eval-every", "20", "--threads", "2", "--no-progress"]
TINY += ["--members", "1"]
METRIC_KEYS = {"accuracy", "precision", "recall", "f1", "fpr", "n", "messages_per_second"}


def invoke(*args) -> object:
    result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, sms_corpus) -> Path:
    """The first 600 messages (about 80 spam) of the real corpus."""
    path = tmp_path_factory.mktemp("sms") / "SMSSpamCollection"
    path.write_text("".join(sms_corpus.read_text().splitlines(keepends=True)[:600]))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("run") / "model"
    result = invoke("--data", small_corpus, "--out", out, "--no-balance", *TINY)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "model.json").read_text()), result.output


def test_training_writes_checkpoint_card_and_plots(trained, small_corpus):
    out, card, output = trained
    for name in (
        "model.safetensors",
        "model.json",
        "training_curves.png",
        "test_scores.png",
        "reliability.png",
    ):
        assert (out / name).stat().st_size > 1000, name
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert card["data"]["sources"][0]["origin"] == str(small_corpus)
    assert card["data"]["split_sizes"] == {"train": 419, "validation": 59, "test": 122}
    training = card["training"]
    assert training["arch"] == "gpt-tiny" and training["epochs"] == 2 and training["trainable"] == "all"
    assert training["lr"] == 5e-4 and training["schedule"] == "cosine"  # the `random` recipe's defaults
    assert training["max_tokens"] == 256 and training["steps"] is None  # --epochs replaced the steps
    assert training["train_seconds"] > 0 and training["device"] == "cpu"
    for split in ("train", "validation", "test"):
        metrics = card["metrics"][split]
        assert sum(metrics["confusion"].values()) == metrics["n"] == card["data"]["split_sizes"][split]
        assert 0.0 <= metrics["fpr"] <= 1.0 and 0.0 <= metrics["f1"] <= 1.0
    assert card["metrics_argmax"]["test"]["accuracy"] >= 0.8
    assert 0.5 <= card["thresholds"]["spam"] <= 1.0
    assert card["thresholds"]["spam"] / 2 <= card["thresholds"]["unsure"] <= card["thresholds"]["spam"]
    assert all(round(value, 3) == value for value in card["thresholds"].values())
    # Calibration: the kept epoch, its temperature, and the measures the issue asks for.
    assert card["ensemble"]["selected_epochs"] in ([1], [2]) and 0.05 <= card["temperature"] <= 100
    test = card["metrics"]["test"]
    assert 0.0 <= test["ece"] <= 1.0 and 0.0 <= test["brier"] <= 1.0 and test["unsure"] >= 0
    assert sum(row["n"] for row in card["test_reliability"]) == card["data"]["split_sizes"]["test"]
    assert len(card["history"]["val_calibrated_nll"]) == 2
    # 51 validation ham cannot measure 0.5 %: thresholds are counted on 5-fold cross-validation.
    choice = card["threshold_choice"]
    assert choice["chosen_on"].startswith("5-fold cross-validation") and choice["messages"] == 419 + 59
    assert choice["metrics"]["n"] == 478 and choice["metrics"]["fpr"] <= 0.005
    assert "cross-validation for the thresholds: fold 5 of 5" in output
    assert card["max_tokens"] <= 128 and card["architecture"]["emb_dim"] == 32
    assert len(card["history"]["val_accuracy"]) == 2 and card["history"]["train_loss"]
    assert "epoch 1 (step 000020): train loss" in output and "validation accuracy" in output
    classifier = SpamClassifier.load(out, device="cpu")
    assert classifier.thresholds == Thresholds(**card["thresholds"])
    assert classifier.temperature == card["temperature"]
    assert classifier.max_tokens == card["max_tokens"]


def test_same_seed_gives_the_same_model(trained, small_corpus, tmp_path):
    _, card, _ = trained
    result = invoke("train", "--data", small_corpus, "--out", tmp_path / "again", "--no-balance", *TINY)
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "again" / "model.json").read_text())
    assert again["metrics"] == card["metrics"]
    assert again["weights_sha256"] == card["weights_sha256"]


def test_same_seed_same_weights_with_a_real_embedding(small_corpus, tmp_path):
    """gpt-micro's 128-wide embedding rows are summed over threads in the backward pass; without
    deterministic kernels two runs of one seed drifted apart (found comparing two default runs)."""
    args = ["--data", small_corpus, "--no-balance", "--arch", "gpt-micro", "--steps", "40", "--cv-folds", "0"]
    args += ["--eval-every", "1000", "--threads", "2", "--no-progress", "--members", "1"]
    cards = []
    for run in ("a", "b"):
        assert invoke(*args, "--out", tmp_path / run).exit_code == 0
        cards.append(json.loads((tmp_path / run / "model.json").read_text()))
    assert cards[0]["weights_sha256"] == cards[1]["weights_sha256"]


def test_members_are_trained_from_their_own_seeds_and_averaged(small_corpus, tmp_path):
    """`--members 2` ships one checkpoint whose first member is exactly the one-member run of the
    same seed, and whose scores are the mean of the members' logits under one temperature."""
    args = ["--data", small_corpus, "--no-balance", "--cv-folds", "0", *TINY[:-2], "--epochs", "1"]
    assert invoke(*args, "--members", "2", "--out", tmp_path / "pair").exit_code == 0
    assert invoke(*args, "--members", "1", "--out", tmp_path / "one").exit_code == 0
    card = json.loads((tmp_path / "pair" / "model.json").read_text())
    assert card["members"] == 2 and card["ensemble"]["seeds"] == [123, 1123]
    assert card["ensemble"]["selected_epochs"] == [1, 1] and card["training"]["members"] == 2
    pair = load_file(str(tmp_path / "pair" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert one.keys() == {name.removeprefix("members.0.") for name in pair if name.startswith("members.0.")}
    assert all(torch.equal(one[name], pair[f"members.0.{name}"]) for name in one)
    assert not torch.equal(one["out_head.weight"], pair["members.1.out_head.weight"])
    classifier = SpamClassifier.load(tmp_path / "pair", device="cpu")
    text = "WINNER!! claim your free prize now, text WIN to 80086"
    ids = torch.tensor([classifier.tokenizer.encode(text)])
    last = torch.tensor([ids.shape[1] - 1])
    with torch.no_grad():
        mean = torch.stack([member(ids, last) for member in classifier.model.members]).mean(dim=0)
    expected = torch.softmax(mean / card["temperature"], dim=-1)[0, 1].item()
    assert classifier.score([text])[0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("members", [1, 2])
def test_the_trained_model_is_returned_in_eval_mode(small_corpus, members):
    """The card's metrics and thresholds are read from the returned model: with dropout still on
    (a validation pass used to leave it in training mode) every score was blurred."""
    splits, _ = build_splits(DataOptions(data=small_corpus, balance=False))
    config = TrainConfig(**{**RECIPES["random"], "arch": "gpt-tiny", "steps": 20, "members": members})
    result = train(splits, config, progress=False)
    assert config.dropout > 0 and not any(module.training for module in result.model.modules())
    texts = list(splits.test["Text"])
    first, again = (
        score_texts(result.model, texts, result.max_tokens, result.temperature, "cpu", "fp32")
        for _ in range(2)
    )
    assert first == again


def _labelled_csv(path: Path, sms_corpus: Path, lines: slice) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Label", "Text"])
        for line in sms_corpus.read_text().splitlines()[lines]:
            writer.writerow(line.split("\t", 1))
    return path


def test_evaluate_json_and_text(trained, sms_corpus, tmp_path):
    out, _, _ = trained
    held_out = _labelled_csv(tmp_path / "held_out.csv", sms_corpus, slice(5000, 5100))
    result = invoke("evaluate", "--model", out, "--test-csv", held_out, "--json", "--threads", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) >= METRIC_KEYS
    assert report["n"] == 100 and report["messages_per_second"] > 0
    assert 0.0 <= report["accuracy"] <= 1.0
    text = invoke("evaluate", "--model", out, "--test-csv", held_out)
    assert text.exit_code == 0 and "messages/s" in text.output and "spam caught" in text.output


def test_own_mail_trains_and_evaluates(tmp_path):
    ham, spam = make_mail(tmp_path, n=20)
    out = tmp_path / "mine"
    result = invoke(
        "train", "--no-sms", "--ham", ham, "--spam", spam, "--out", out, "--batch-size", "4", *TINY
    )
    assert result.exit_code == 0, result.output
    card = json.loads((out / "model.json").read_text())
    source = card["data"]["sources"][0]
    assert source["kind"] == "mail" and source["messages"] == {"ham": 20, "spam": 20}
    assert sum(card["data"]["split_sizes"].values()) == 40
    report = json.loads(invoke("evaluate", "--model", out, "--ham", ham, "--spam", spam, "--json").output)
    assert report["n"] == 42  # evaluation keeps duplicates: it measures what arrives


def test_email_corpus_and_sms_train_one_model_measured_per_source(tmp_path, small_corpus):
    corpus = make_email_corpus(tmp_path / "corpus", n=20)
    out = tmp_path / "both"
    result = invoke("--data", small_corpus, "--no-balance", "--email-corpus", corpus, "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "model.json").read_text())
    assert [source["kind"] for source in card["data"]["sources"]] == ["sms", "email-corpus"]
    by_source = card["metrics_by_source"]
    assert set(by_source) == {"sms", "email"}
    assert by_source["email"]["test"]["n"] == 12 and by_source["sms"]["test"]["n"] == 122
    assert by_source["email"]["test"]["n"] + by_source["sms"]["test"]["n"] == card["metrics"]["test"]["n"]
    assert "test email" in result.output and "test sms" in result.output


def test_no_cross_validation_counts_thresholds_on_validation(tmp_path, small_corpus):
    out = tmp_path / "no-cv"
    result = invoke("--data", small_corpus, "--no-balance", "--out", out, "--cv-folds", "0", *TINY)
    assert result.exit_code == 0, result.output
    choice = json.loads((out / "model.json").read_text())["threshold_choice"]
    assert choice["chosen_on"] == "validation" and choice["messages"] == 59
    assert "cross-validation" not in result.output


def test_steps_size_the_run_by_updates(tmp_path, small_corpus):
    out = tmp_path / "steps"
    args = TINY[:2] + TINY[4:]  # without --epochs 2
    result = invoke("--data", small_corpus, "--no-balance", "--out", out, "--steps", "60", *args)
    assert result.exit_code == 0, result.output
    training = json.loads((out / "model.json").read_text())["training"]
    assert training["steps"] == 60 and training["epochs_run"] == 2  # 419 messages = 52 batches of 8


def test_label_path_csv_splits(tmp_path):
    (tmp_path / "msgs").mkdir()
    rows = []
    for i in range(30):
        for label, text in (
            ("ham", f"see you at lunch {i}"),
            ("spam", f"URGENT win {i} cash, text WIN to 8{i}"),
        ):
            name = f"msgs/{label}{i}.txt"
            (tmp_path / name).write_text(f"Subject: note {i}\n\n{text}\n")
            rows.append([label, name])
    train_csv = tmp_path / "train.csv"
    with train_csv.open("w", newline="") as handle:
        csv.writer(handle).writerows([["Label", "Path"], *rows])
    out = tmp_path / "csv-model"
    result = invoke("--train-csv", train_csv, "--out", out, "--batch-size", "4", *TINY)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "model.json").read_text())
    assert card["data"]["split_sizes"] == {"train": 42, "validation": 6, "test": 12}
    assert "cut from --train-csv" in card["data"]["preparation"]


def test_pretrained_directory_is_fine_tuned(tmp_path, small_corpus):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "tuned"
    result = invoke(
        "--data", small_corpus, "--weights", tmp_path / "hf", "--out", out, "--epochs", "1", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    card = json.loads((out / "model.json").read_text())
    training = card["training"]
    assert training["trainable"] == "last-block" and training["lr"] == 5e-5  # the reference recipe
    assert training["trainable_parameters"] < training["total_parameters"]
    assert card["architecture"]["emb_dim"] == 32 and card["architecture"]["n_layers"] == 2
    assert card["data"]["split_sizes"] == {"train": 123, "validation": 17, "test": 36}
    # The daemon loads it; what was frozen is OpenAI's layout read as is, the last block has moved.
    model = SpamClassifier.load(out, device="cpu").model
    pretrained = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(model.tok_emb.weight, pretrained["transformer.wte.weight"])
    assert torch.equal(model.trf_blocks[0].norm1.weight, pretrained["transformer.h.0.ln_1.weight"])
    assert not torch.equal(model.trf_blocks[-1].norm1.weight, pretrained["transformer.h.1.ln_1.weight"])


def test_help_and_version():
    assert "evaluate" in invoke("--help").output
    assert "--max-fpr" in invoke("train", "--help").output
    assert "--json" in invoke("evaluate", "--help").output
    assert invoke("--version").output.startswith("spamfilterd-train, version")


def test_bad_data_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\thello\nspma\tcheap\n")
    result = CliRunner().invoke(main, ["--data", str(bad), "--out", str(tmp_path / "x"), "--no-progress"])
    assert result.exit_code == 1
    assert f"Error: {bad}: line 2: unknown label 'spma'" in result.output
    assert not (tmp_path / "x").exists()
