"""SpamAssassin (rules + Bayes) and bogofilter on the email split model_quality.py measures us on.

    python benchmarks/peer_filters.py --seeds 123,7,42 --log FILE
    python benchmarks/model_quality.py default --peers --seeds 123,7,42   # beside ours, same run

The split is `trainer.data.build_splits`'s for the `default` setup and the seed, so the email test
set is exactly the one in docs/training.md's table. Each peer learns the raw training and
validation emails (our model trains on the first and calibrates on the second; the peers have no
calibration step) and scores the raw test emails at its shipped cut-offs, as an admin runs it:

* SpamAssassin: its rules plus Bayes (`sa-learn` on the same mail, auto-learn off), scored by
  `spamd` through `spamc`, two at a time; spam from `required_score` 5.0. Local tests only: this
  machine reaches no network, so DNS blocklists, Razor and Pyzor are off.
* bogofilter: trained with `-n`/`-s`, spam from `spam_cutoff` 0.99, unsure from `ham_cutoff` 0.45.

A test text maps back to the first raw message that reads as it (the split keeps one copy of each
text). Needs the Debian packages spamassassin, spamd, spamc and bogofilter.
"""

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from spamfilterd.mailsource import iter_messages
from spamfilterd.message import message_to_text
from trainer.data import Splits, build_splits, email_corpus_folders, source_kind
from trainer.metrics import classification_metrics

SA_SITE_CONFIG = Path("/etc/spamassassin")
SA_SETTINGS = """
use_bayes 1
bayes_auto_learn 0
bayes_auto_expire 0
bayes_path {bayes}
skip_rbl_checks 1
use_razor2 0
use_pyzor 0
dns_available no
lock_method flock
"""
SPAMC_MAX_BYTES = 10 * 1024 * 1024
SPAMD_START_TIMEOUT_S = 120


def raw_by_text(corpus: Path) -> dict[str, bytes]:
    """Each text of the corpus and the first raw message that reads as it, in the trainer's order."""
    ham, spam = email_corpus_folders(corpus)
    raws: dict[str, bytes] = {}
    for folder in ham + spam:
        for _name, raw in iter_messages(folder):
            raws.setdefault(message_to_text(raw).text, raw)
    return raws


def _email_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[source_kind(source) == "email" for source in frame["Source"]]]


def _write(folder: Path, texts: list[str], raws: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for number, text in enumerate(texts):
        path = folder / f"{number:05d}"
        path.write_bytes(raws[text])
        paths.append(path)
    return paths


def _metrics(labels: list[int], verdicts: list[str], seconds: float) -> dict:
    counted = classification_metrics(labels, [1.0 if verdict == "spam" else 0.0 for verdict in verdicts])
    return {
        **{key: round(float(counted[key]), 5) for key in ("accuracy", "fpr", "recall", "f1")},
        "unsure_share": round(verdicts.count("unsure") / len(verdicts), 5),
        "confusion": counted["confusion"],
        "learn_and_score_s": round(seconds, 1),
    }


def bogofilter(work: Path, ham: list[Path], spam: list[Path], test: list[Path]) -> list[str]:
    """bogofilter's verdict per test message (S/H/U at its shipped cut-offs)."""
    database = work / "bogofilter"
    database.mkdir()
    for flag, paths in (("-n", ham), ("-s", spam)):
        subprocess.run(
            ["bogofilter", "-d", str(database), flag, "-b"],
            input="\n".join(map(str, paths)) + "\n",
            text=True,
            check=True,
        )
    scored = subprocess.run(
        ["bogofilter", "-d", str(database), "-T", "-b"],
        input="\n".join(map(str, test)) + "\n",
        capture_output=True,
        text=True,
        check=False,  # exit 0 spam, 1 ham, 2 unsure: of the last message only
    )
    verdict_of = {}
    for line in scored.stdout.splitlines():
        name, letter, _spamicity = line.rsplit(" ", 2)
        verdict_of[name] = {"S": "spam", "H": "ham", "U": "unsure"}[letter]
    return [verdict_of[str(path)] for path in test]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spamc(port: int, path: Path) -> tuple[str, bool]:
    """(verdict, whether a Bayes rule fired) from spamd's report on one message."""
    with path.open("rb") as message:
        answer = subprocess.run(
            ["spamc", "-d", "127.0.0.1", "-p", str(port), "-x", "-R", "-s", str(SPAMC_MAX_BYTES)],
            stdin=message,
            capture_output=True,
            encoding="utf-8",
            errors="replace",  # the report quotes the message, in whatever bytes it has
            check=False,
        )
    if answer.returncode not in (0, 1):
        raise RuntimeError(f"spamc failed on {path}: {answer.stderr.strip() or answer.returncode}")
    first_line, _, report = answer.stdout.partition("\n")
    score, required = (float(part) for part in first_line.strip().split("/"))
    return ("spam" if score >= required else "ham"), "BAYES_" in report


def _start_spamd(site: Path, port: int, work: Path) -> subprocess.Popen:
    command = ["spamd", "--siteconfigpath", str(site), "--local", "--nouser-config"]
    command += ["--listen", f"127.0.0.1:{port}", "--max-children", "2", "--min-children", "2"]
    command += ["--syslog", "stderr", "--pidfile", str(work / "spamd.pid")]
    if os.geteuid() == 0:
        command += ["--username", "nobody"]  # spamd will not run as root
    with (work / "spamd.log").open("wb") as log:
        spamd = subprocess.Popen(command, stderr=log)
    deadline = time.monotonic() + SPAMD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if spamd.poll() is not None:
            raise RuntimeError(f"spamd exited: {(work / 'spamd.log').read_text()[-2000:]}")
        ping = subprocess.run(["spamc", "-d", "127.0.0.1", "-p", str(port), "-K"], capture_output=True)
        if ping.returncode == 0:
            return spamd
        time.sleep(1)
    spamd.kill()
    raise RuntimeError(f"spamd did not answer within {SPAMD_START_TIMEOUT_S} s")


def spamassassin(work: Path, ham_dir: Path, spam_dir: Path, test: list[Path]) -> list[tuple[str, bool]]:
    """SpamAssassin's (verdict, Bayes fired) per test message, its Bayes trained on the training mail
    first; the Bayes share shows the database was read (SpamAssassin skips Bayes silently below 200
    learned ham or spam, or when it cannot open the database)."""
    site = work / "sa-site"
    shutil.copytree(SA_SITE_CONFIG, site)
    with (site / "local.cf").open("a") as local:
        local.write(SA_SETTINGS.format(bayes=work / "bayes" / "bayes"))
    learn = ["sa-learn", "--siteconfigpath", str(site), "--local", "--no-sync"]
    subprocess.run([*learn, "--ham", str(ham_dir)], check=True, capture_output=True)
    subprocess.run([*learn, "--spam", str(spam_dir)], check=True, capture_output=True)
    subprocess.run(["sa-learn", "--siteconfigpath", str(site), "--sync"], check=True, capture_output=True)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in [work, *work.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    port = _free_port()
    spamd = _start_spamd(site, port, work)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(lambda path: _spamc(port, path), test))
    finally:
        spamd.send_signal(signal.SIGTERM)
        spamd.wait(timeout=30)


def peer_metrics(splits: Splits, raws: dict[str, bytes]) -> dict:
    """{peer: metrics on the split's email test set} after learning its training + validation email."""
    learned = pd.concat([_email_rows(splits.train), _email_rows(splits.validation)])
    test = _email_rows(splits.test)
    labels = test["Label"].astype(int).tolist()
    results = {}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(tmp)
        ham = _write(work / "ham", learned[learned["Label"] == 0]["Text"].tolist(), raws)
        spam = _write(work / "spam", learned[learned["Label"] == 1]["Text"].tolist(), raws)
        test_paths = _write(work / "test", test["Text"].tolist(), raws)
        started = time.perf_counter()
        verdicts = bogofilter(work, ham, spam, test_paths)
        results["bogofilter"] = {"email": _metrics(labels, verdicts, time.perf_counter() - started)}
        started = time.perf_counter()
        answers = spamassassin(work, work / "ham", work / "spam", test_paths)
        email = _metrics(labels, [verdict for verdict, _ in answers], time.perf_counter() - started)
        email["bayes_fired_share"] = round(sum(bayes for _, bayes in answers) / len(answers), 5)
        results["spamassassin"] = {"email": email}
    return results


def main() -> None:
    # Imported here: model_quality imports this module for --peers.
    from model_quality import EMAIL, SMS, data_options, emit

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="123")
    parser.add_argument("--sms", type=Path, default=SMS)
    parser.add_argument("--email", type=Path, default=EMAIL)
    parser.add_argument("--log", type=Path)
    args = parser.parse_args()
    raws = raw_by_text(args.email)
    for seed in [int(value) for value in args.seeds.split(",")]:
        splits, _ = build_splits(data_options("default", seed, False, args.sms, args.email))
        emit({"setup": "default", "seed": seed, "peers": peer_metrics(splits, raws)}, args.log)


if __name__ == "__main__":
    main()
