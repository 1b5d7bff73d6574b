"""`spamfilterd classify` / `check-config` as an MDA runs them: real processes, files and exit codes.

Each process that loads the model imports torch (seconds), so each run below checks several
things at once. Verdicts are forced through config thresholds or GTUBE, since the tiny test
model is random.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spamfilterd.engine import GTUBE

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "tests" / "data" / "messages"

FORGED = (
    b"X-Spam-Flag: NO\r\nX-Spam-Status: No, score=0.000\r\n\trequired=9.9 forged\r\nX-Spam-Score: 0.0\r\n"
)
PLAIN = (
    b"Return-Path: <alice@example.com>\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Lunch tomorrow?\r\n"
    + FORGED
    + b"Message-ID: <1@example.com>\r\n\r\nHi Bob,\r\n\r\nlunch at noon?\r\n\r\nAlice\r\n"
)
MULTIPART = (
    b"From: Carol <carol@example.net>\r\nTo: bob@example.org\r\n"
    b"Subject: =?UTF-8?B?UmVjaG51bmcgZsO8ciBOb3ZlbWJlcg==?=\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="XYZ"\r\n\r\n'
    b"--XYZ\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlease find the invoice attached.\r\n"
    b'--XYZ\r\nContent-Type: application/pdf; name="invoice.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
    b'Content-Disposition: attachment; filename="invoice.pdf"\r\n\r\nJVBERi0xLjQKJcfsj6IK\r\n--XYZ--\r\n'
)
LATIN1 = (
    b"From: =?iso-8859-1?q?J=FCrgen?= <j@example.de>\nTo: bob@example.org\nSubject: Gr\xfc\xdfe\n"
    b"MIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit\n\n"
    b"Sch\xf6ne Gr\xfc\xdfe aus M\xfcnchen\n"
)
GTUBE_MAIL = b"From: admin@example.org\nSubject: GTUBE test\n\n" + GTUBE + b"\n"
MBOX = b"From a@x Thu Nov 26 10:00:00 2026\n" + LATIN1 + b"\nFrom b@y Thu Nov 26 10:00:01 2026\n" + LATIN1


def _run(args, tmp_path, stdin=b"", env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "SPAMFILTERD_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "spamfilterd.cli", *args],
        input=stdin,
        capture_output=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )


def _config(tmp_path: Path, checkpoint: Path, thresholds: dict, rules=None, name="spamfilterd.yaml") -> Path:
    data = {"model": {"checkpoint": str(checkpoint), "threads": 1, "batch_size": 4}, "thresholds": thresholds}
    if rules is not None:
        data["rules"] = rules
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _headers_and_body(message: bytes, newline: bytes = b"\r\n") -> tuple[bytes, bytes]:
    head, _, body = message.partition(newline + newline)
    return head, body


ALL_SPAM = {"spam": 0.0}
ALL_HAM = {"spam": 1.01, "unsure": 1.01}
ALL_UNSURE = {"spam": 1.01, "unsure": 0.0}
RULES = [
    {"name": "partner", "match": {"sender_in": ["*@partner.example"]}, "actions": ["accept"]},
    {
        "name": "quarantine",
        "match": {"verdict": "spam", "score_max": 1.0},
        "actions": ["tag", {"subject-prefix": "[SPAM] "}, {"redirect": "quarantine@example.org"}],
    },
    {"name": "gtube", "match": {"verdict": "spam"}, "actions": [{"reject": "GTUBE seen"}]},
]


def test_many_files_mbox_and_maildir_give_one_json_line_each(tmp_path, tiny_checkpoint):
    samples = [*SAMPLES.glob("*.eml"), SAMPLES / "sms.txt"]
    (tmp_path / "inbox").mkdir()
    for sample in samples:
        shutil.copy(sample, tmp_path / "inbox")
    (tmp_path / "archive.mbox").write_bytes(MBOX)
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1764151200.M1P1.host").write_bytes(PLAIN)
    config = _config(tmp_path, tiny_checkpoint, ALL_HAM, RULES)

    run = _run(
        ["classify", "--config", str(config), "inbox", "archive.mbox", "Maildir", "missing.eml"], tmp_path
    )

    assert run.returncode == 3, run.stderr  # missing.eml failed, the others were still classified
    assert b"missing.eml" in run.stderr and b"Traceback" not in run.stderr
    records = [json.loads(line) for line in run.stdout.decode().splitlines()]
    assert len(records) == len(samples) + 2 + 1
    by_file = {Path(r["file"]).name: r for r in records}
    gtube = by_file.pop("gtube.eml")
    assert (gtube["verdict"], gtube["score"], gtube["rule"], gtube["actions"]) == (
        "spam",
        1.0,
        "gtube",
        ["reject"],
    )
    assert {r["verdict"] for r in by_file.values()} == {"ham"}
    assert {r["rule"] for r in by_file.values()} == {"default"}
    assert {sample.name for sample in samples} <= {*by_file, "gtube.eml"}
    assert all(0.0 <= r["score"] <= 1.0 and r["model"].startswith("tiny-test@") for r in records)


def test_filter_tags_spam_and_keeps_body_bytes(tmp_path, tiny_checkpoint):
    config = _config(tmp_path, tiny_checkpoint, ALL_SPAM, RULES)
    args = ["classify", "--config", str(config), "--filter", "--recipient", "bob@example.org", "-"]

    run = _run(args, tmp_path, stdin=MULTIPART.replace(b"MIME-Version", FORGED + b"MIME-Version"))

    assert run.returncode == 0, run.stderr
    head, body = _headers_and_body(run.stdout)
    _, original_body = _headers_and_body(MULTIPART)
    assert body == original_body
    assert b"forged" not in head and head.count(b"X-Spam-Flag") == 1
    assert b"\r\nSubject: [SPAM] =?UTF-8?B?UmVjaG51bmcgZsO8ciBOb3ZlbWJlcg==?=\r\n" in head
    assert head.startswith(b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=")
    assert b" verdict=spam rule=quarantine model=tiny-test@" in head
    assert b"\r\nX-Spam-Original-Recipients: bob@example.org\r\n" in head
    assert b"\r\nX-Spam-Model: tiny-test@" in head


def test_stdin_ham_prints_verdict_and_exits_1(tmp_path, tiny_checkpoint):
    config = _config(tmp_path, tiny_checkpoint, ALL_HAM)
    run = _run(["classify", "--config", str(config), "-"], tmp_path, stdin=LATIN1)
    assert run.returncode == 1, run.stderr
    verdict, score, rule, actions = run.stdout.decode().split()
    assert (verdict, rule, actions) == ("ham", "rule=default", "actions=accept")
    assert 0.0 <= float(score) <= 1.0


def test_unsure_exit_code_with_json_output(tmp_path, tiny_checkpoint):
    config = _config(tmp_path, tiny_checkpoint, ALL_UNSURE)
    run = _run(
        ["classify", "--config", str(config), "--format", "json", str(SAMPLES / "html_only.eml")], tmp_path
    )
    assert run.returncode == 2, run.stderr
    assert json.loads(run.stdout)["verdict"] == "unsure"


def test_gtube_without_config_file_using_model_option(tmp_path, tiny_checkpoint):
    if Path("/etc/spamfilterd/config.yaml").exists():
        pytest.skip("a system config exists on this machine")
    run = _run(
        ["classify", "--model", str(tiny_checkpoint), "--format", "json", "-"], tmp_path, stdin=GTUBE_MAIL
    )
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert (record["file"], record["verdict"], record["score"], record["rule"]) == (
        "-",
        "spam",
        1.0,
        "default",
    )
    assert "GTUBE test string found" in record["notes"]


def test_broken_model_with_tempfail_writes_nothing_and_exits_75(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_bytes((tiny_checkpoint / "model.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    args = ["classify", "--model", str(broken), "--filter", "--tempfail-on-error", "-"]
    run = _run(args, tmp_path, stdin=PLAIN)
    assert run.returncode == 75
    assert run.stdout == b""
    assert b"cannot load the model" in run.stderr and b"Traceback" not in run.stderr


def test_config_errors_exit_78_without_loading_torch(tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"model": {"checkpoint": str(tiny_checkpoint)}, "rules": [{"actions": ["tagg"]}]})
    )
    run = _run(["classify", "--config", str(bad), "--filter", "-"], tmp_path, stdin=PLAIN)
    assert run.returncode == 78
    assert run.stdout == b""
    assert f"{bad}: rules[0].actions[0]: unknown action 'tagg'".encode() in run.stderr

    run = _run(["classify", "--config", str(bad), "--tempfail-on-error", "-"], tmp_path, stdin=PLAIN)
    assert run.returncode == 75

    run = _run(["check-config", "--config", str(bad)], tmp_path)
    assert run.returncode == 78 and b"unknown action 'tagg'" in run.stderr

    missing = _run(["check-config", "--model", str(tmp_path / "nope")], tmp_path)
    assert missing.returncode == 78
    assert (
        b"model.checkpoint: file not found" in missing.stderr
        and b"spamfilterd-train --out DIR" in missing.stderr
    )


def test_usage_errors_never_exit_2(tmp_path):
    assert _run(["classify", "--no-such-option", "-"], tmp_path).returncode == 64
    assert _run(["classify", "--filter", "a.eml", "b.eml"], tmp_path).returncode == 64
    assert _run(["classify", "--filter", "--tempfail-on-error", "a", "b"], tmp_path).returncode == 75


def test_check_config_prints_effective_config_without_torch(tmp_path, tiny_checkpoint):
    config = tmp_path / "config.yaml"
    default = (REPO_ROOT / "config.yaml").read_text()
    config.write_text(default.replace("checkpoint: models/default", f"checkpoint: {tiny_checkpoint}"))
    code = (
        "import sys; from spamfilterd.cli import main\n"
        "try:\n    main(['check-config'])\nexcept SystemExit as e:\n"
        "    assert 'torch' not in sys.modules, 'check-config imported torch'\n    raise\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SPAMFILTERD_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=tmp_path, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    out = run.stdout.decode()
    assert "# thresholds in effect: spam=0.5 unsure=0.3" in out
    effective = yaml.safe_load(out)
    assert effective["model"]["checkpoint"] == str(tiny_checkpoint.resolve())
    assert [rule["name"] for rule in effective["rules"]] == ["postmaster", "spam", "unsure"]
    assert effective["smtp"]["listen"] == "127.0.0.1:10025"


def test_check_config_refuses_a_nan_timeout_with_exit_78(tmp_path, tiny_checkpoint):
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  checkpoint: {tiny_checkpoint}\nsmtp:\n  data_timeout: .nan\n")
    run = _run(["check-config", "--config", str(config)], tmp_path)
    assert run.returncode == 78
    assert f"{config}: smtp.data_timeout: expected a finite number, got nan".encode() in run.stderr
    assert run.stdout == b""


def test_a_text_starting_with_from_is_classified_whole_not_as_an_mbox(tmp_path, tiny_checkpoint):
    text = b"From tomorrow onwards eve 6 to 3 work."
    (tmp_path / "sms.txt").write_bytes(text)
    run = _run(["classify", "--model", str(tiny_checkpoint), "sms.txt"], tmp_path)
    assert run.returncode in (0, 1, 2), run.stderr  # the verdict's exit code
    (record,) = [json.loads(line) for line in run.stdout.decode().splitlines()]
    assert (record["file"], record["text_chars"]) == ("sms.txt", len(text))
