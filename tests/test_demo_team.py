"""The demo shared by a team: sign-in in front of every route, roles enforced in the handlers, no
server file a visitor did not upload, an append-only audit trail, inert stored text, and every
event of both tabs driven through the real Gradio client (exports included)."""
from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

pytest.importorskip("gradio")
pytest.importorskip("argon2")

from dhumor.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "dhumor" / "assets" / "examples" / "horse.jpg"
PASSWORDS = {"rita": "rita-reviews-memes", "adam": "adam-admins-memes"}
NOTE = "=cmd|' /C calc'!A0 <img src=x onerror=alert(1)> **bold**"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _users(path: Path) -> Path:
    for name, role in (("rita", "reviewer"), ("adam", "admin")):
        _add(path, name, role)
    return path


def _add(path, name, role) -> bool:
    r = subprocess.run([sys.executable, "-m", "dhumor.cli", "users", "add", str(path), name, "--role", role,
                        "--password-stdin"], input=PASSWORDS[name] + "\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return True


@pytest.fixture(scope="module")
def team(trained, harmeme_fixture, tmp_path_factory):
    """The demo in this process, signed-in, with a queue root holding a results file and a folder."""
    from dhumor.app.auth import Users
    from dhumor.cache import StageCache
    from dhumor.app.demo import launch
    from dhumor.inference.pipeline import Pipeline
    from dhumor.review.log import ReviewLog

    tmp = tmp_path_factory.mktemp("team")
    root = tmp / "queues"
    root.mkdir()
    assert main(["score", str(harmeme_fixture), "--checkpoint", str(trained / "export"), "--ocr", "none", "--out",
                 str(root / "scored.jsonl"), "--quiet"]) == 0
    folder = root / "memes"
    folder.mkdir()
    for p in sorted(harmeme_fixture.parent.rglob("*.png"))[:4]:
        shutil.copy(p, folder / p.name)
    (root / ".hidden").mkdir()
    (root / "escape").symlink_to("/etc")  # a link out of the root is never listed
    users = Users.load(_users(tmp / "users.json"))
    log = tmp / "reviews.sqlite"
    cache = StageCache(tmp / "cache.sqlite")
    pipe = Pipeline.from_checkpoint(trained / "export", cache=cache)
    port = _port()
    demo = launch(pipe, ReviewLog(log), port=port, block=False, users=users, queue_root=str(root), max_file_mb=0.5)
    yield {"url": f"http://127.0.0.1:{port}/", "log": log, "cache": tmp / "cache.sqlite", "root": root,
           "users": tmp / "users.json", "demo": demo}
    demo.close()


def _client(team, name):
    from gradio_client import Client

    return Client(team["url"], auth=(name, PASSWORDS[name]), verbose=False)


def _session(team, name=None) -> requests.Session:
    s = requests.Session()
    if name:
        r = s.post(team["url"] + "login", data={"username": name, "password": PASSWORDS[name]}, timeout=10)
        assert r.status_code == 200, r.text
    return s


def test_users_cli_hashes_with_argon2_and_refuses_bad_input(tmp_path):
    f = tmp_path / "users.json"
    _add(f, "rita", "reviewer")
    text = f.read_text()
    assert "$argon2id$" in text and PASSWORDS["rita"] not in text
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    bad = subprocess.run([sys.executable, "-m", "dhumor.cli", "users", "add", str(f), "x y", "--password-stdin"],
                         input="long enough pw\n", capture_output=True, text=True)
    assert bad.returncode == 2 and "user name" in bad.stderr
    short = subprocess.run([sys.executable, "-m", "dhumor.cli", "users", "add", str(f), "bob", "--password-stdin"],
                           input="short\n", capture_output=True, text=True)
    assert short.returncode == 2 and "at least 8" in short.stderr
    assert main(["users", "remove", str(f), "rita"]) == 0
    assert json.loads(f.read_text())["users"] == {}
    assert main(["users", "remove", str(f), "rita"]) == 2


def test_a_public_host_without_sign_in_is_refused_before_models_load(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dhumor.cli", "demo", "--host", "0.0.0.0", "--checkpoint",
                        str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--auth USERS_FILE" in r.stderr and "dhumor users add" in r.stderr
    r = subprocess.run([sys.executable, "-m", "dhumor.cli", "demo", "--auth", str(tmp_path / "none.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "dhumor users add" in r.stderr


def test_a_visitor_not_signed_in_reaches_only_the_login(team):
    s = _session(team)
    for path in ("config", "gradio_api/info", "gradio_api/file=/etc/passwd", f"gradio_api/file={EXAMPLE}",
                 "gradio_api/queue/data?session_hash=x"):
        r = s.get(team["url"] + path, timeout=10)
        assert r.status_code in (401, 403), (path, r.status_code)
        assert "root:" not in r.text
    r = s.post(team["url"] + "gradio_api/upload", files={"files": ("m.jpg", EXAMPLE.read_bytes())}, timeout=10)
    assert r.status_code in (401, 403)
    r = s.post(team["url"] + "gradio_api/call/analyze", json={"data": [None, 0.5]}, timeout=10)
    assert r.status_code in (401, 403)
    page = s.get(team["url"], timeout=10)
    # the page is Gradio's shell, without the app's config (the browser test sees the login form)
    assert page.status_code == 200 and "Record verdict" not in page.text and "Checkpoint" not in page.text
    from gradio_client import Client

    with pytest.raises(Exception):
        Client(team["url"], verbose=False)
    bad = requests.post(team["url"] + "login", data={"username": "rita", "password": "wrong password"}, timeout=10)
    assert bad.status_code in (400, 401)


@pytest.mark.parametrize("who", [None, "rita", "adam"])
def test_file_routes_serve_no_server_file(team, who):
    s = _session(team, who)
    log, cache = str(team["log"]), str(team["cache"])
    tricks = ["/etc/passwd", "../../../../etc/passwd", "..%2f..%2f..%2f..%2fetc%2fpasswd",
              quote(quote("/etc/passwd", safe=""), safe=""), f"{EXAMPLE.parent}/../../../../../etc/passwd",
              f"{EXAMPLE.parent}/..%2f..%2f..%2f..%2f..%2fetc/passwd", log, cache, str(team["users"]),
              str(team["root"] / "scored.jsonl"), "file:///etc/passwd"]
    for t in tricks:
        for route in ("gradio_api/file=", "file="):
            r = s.get(team["url"] + route + t, timeout=10)
            assert r.status_code in (400, 401, 403, 404), (route + t, r.status_code)
            assert "root:" not in r.text and "SQLite format" not in r.text and "argon2" not in r.text
    ok = s.get(team["url"] + f"gradio_api/file={EXAMPLE}", timeout=10)
    assert ok.status_code == (200 if who else 401)  # the shipped examples, to signed-in users only


def test_roles_are_enforced_in_the_handlers(team):
    from gradio_client import handle_file

    rita, adam = _client(team, "rita"), _client(team, "adam")
    # rita scores an upload; the verdict is hers whatever name an API caller puts in the hidden box
    out = rita.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/analyze")
    assert any(isinstance(x, str) and x.startswith("## Decision") for x in out), out
    status, table = rita.predict(0.5, "balanced", "override: flag", NOTE, "mallory", api_name="/record")
    assert status.startswith("Recorded review #")
    row = sqlite3.connect(team["log"]).execute(
        "SELECT moderator, signed_in, checkpoint_digest, seen, note FROM reviews ORDER BY id DESC").fetchone()
    assert row[0] == "rita" and row[1] == 1 and len(row[2]) == 64 and row[4] == NOTE
    seen = json.loads(row[3])
    assert set(seen) >= {"probability", "threshold", "preset", "flagged"} and seen["threshold"] == 0.5
    # a reviewer may neither export nor open a queue from the server's folders
    f, msg = rita.predict(api_name="/export")
    assert f is None and "Not allowed" in msg
    got = rita.predict("scored.jsonl", "uncertain", 0, "", api_name="/queue_open")
    assert any(isinstance(x, str) and "Not opened" in x and "may not open queue" in x for x in got), got
    got = rita.predict("uncertain", 0, "", api_name="/queue_load")
    assert any(isinstance(x, str) and "No queue is open yet" in x for x in got), got
    # the admin opens one from the list (a typed path or a link out of the root is refused)
    for entry in ("/etc", "../queues/scored.jsonl", "escape", ".hidden"):
        got = adam.predict(entry, "uncertain", 0, "", api_name="/queue_open")
        assert any(isinstance(x, str) and "Not opened" in x for x in got), (entry, got)
    got = adam.predict("scored.jsonl", "uncertain", 0, "", api_name="/queue_open")
    assert any(isinstance(x, str) and "0 of 32 reviewed** by adam" in x for x in got), got
    # now rita reviews it
    got = rita.predict("scored.jsonl", "uncertain", 0, "", api_name="/queue_start")
    assert any(isinstance(x, str) and "0 of 32 reviewed** by rita" in x for x in got), got


def test_every_event_of_both_tabs_through_the_client(team, tmp_path):
    from gradio_client import handle_file

    adam = _client(team, "adam")
    names = set(adam.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/analyze", "/rescore", "/preset", "/threshold", "/record", "/export", "/whoami", "/queue_start",
            "/queue_reviewer", "/queue_open", "/queue_save", "/queue_skip", "/queue_export", "/queue_load",
            "/queue_harmfulness", "/queue_harmful", "/queue_clear_note"} <= names, names
    out = adam.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/analyze")
    assert any(isinstance(x, str) and x.startswith("## Decision") for x in out)
    out = adam.predict(handle_file(str(EXAMPLE)), "WHEN THE VET SAYS", 0.5, api_name="/rescore")
    assert out[-1].startswith("Scored in"), out
    assert isinstance(adam.predict("high precision", api_name="/preset"), float)
    adam.predict(0.3, api_name="/threshold")
    status, _ = adam.predict(0.5, "balanced", "confirm", "fine", "", api_name="/record")
    assert status.startswith("Recorded review #")
    for _ in range(2):  # two clicks: one file, not two
        path, msg = adam.predict(api_name="/export")
        assert path and Path(path).is_file() and "Exported" in msg
    text = Path(path).read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and all(not r["note"].startswith(("=", "+", "-", "@")) for r in rows)
    assert any(r["note"] == "'" + NOTE for r in rows)  # rita's formula, neutralised
    exports = Path(team["demo"]._dhumor_exports.name)
    assert [p.name for p in exports.iterdir()] == ["reviews-adam.csv"]
    whoami = adam.predict(api_name="/whoami")
    assert any(isinstance(x, str) and "Signed in as **adam**" in x for x in whoami)

    adam.predict("scored.jsonl", "uncertain", 0, "", api_name="/queue_open")
    got = adam.predict("scored.jsonl", "flagged", 0, "", api_name="/queue_start")
    assert any(isinstance(x, str) and "order: flagged" in x for x in got)
    adam.predict("scored.jsonl", "uncertain", 0, "", api_name="/queue_reviewer")  # Enter in the reviewer box: the same as Review
    assert adam.predict("not harmful", api_name="/queue_harmfulness") == "no"
    assert adam.predict("yes", "not harmful", api_name="/queue_harmful") == "somewhat harmful"
    got = adam.predict("", "a caption", NOTE, "yes", "very harmful", "community", api_name="/queue_save")
    assert any(isinstance(x, str) and "Recorded review #" in x for x in got), got
    assert adam.predict(api_name="/queue_clear_note") == ""  # the note box empties after a save
    got = adam.predict("", api_name="/queue_skip")
    assert any(isinstance(x, str) and "Skipped" in x for x in got)
    path, msg = adam.predict(api_name="/queue_export")
    assert path and "Exported 1 memes" in msg
    rec = json.loads(Path(path).read_text().splitlines()[0])
    assert rec["note"] == NOTE  # JSONL, not a spreadsheet: kept as typed
    adam.predict(api_name="/queue_export")  # again: replaced, not piled up
    assert sorted(p.name for p in exports.iterdir()) == ["reviewed-adam.jsonl", "reviews-adam.csv"]
    assert team["demo"].delete_cache == (600, 3600)  # Gradio's served copies expire
    # a folder under the root is scored on the way, on the demo's model thread
    got = adam.predict("memes", "uncertain", 0, "", api_name="/queue_open")
    assert any(isinstance(x, str) and "0 of 4 reviewed** by adam" in x for x in got), [x for x in got if isinstance(x, str) and "review" in x]


def test_stored_text_is_escaped_in_markdown():
    from dhumor.app.text import md
    from dhumor.app.demo import explanation_markdown

    trail = {"status": "ok", "stop_reason": "done", "final": {"summary": "<script>x</script> ![t](http://e/t.png)"},
             "iterations": [{"iteration": 1, "kind": "explain", "text": "[click](javascript:alert(1))"}]}
    text = explanation_markdown({"explanation_trail": trail}, True, False)
    assert "<script>" not in text and "](" not in text.replace("\\](", "").replace("\\]\\(", "")
    assert "&lt;script&gt;" in text and "\\!\\[t\\]\\(http://e/t\\.png\\)" in text
    assert md("a_b *c*") == "a\\_b \\*c\\*"


def test_audit_log_is_append_only_and_export_filters_by_user_and_time(tmp_path, harmeme_fixture):
    from dhumor.review.log import ReviewLog
    from dhumor.review.export import export_reviews, parse_time

    log = ReviewLog(tmp_path / "r.sqlite")
    img = sorted(harmeme_fixture.parent.rglob("*.png"))[0]
    from dhumor.images import sha256_bytes

    sha = sha256_bytes(img.read_bytes())
    labels = {"harmful": "no", "harmfulness": "not harmful", "target": None}
    for who in ("rita", "adam"):
        log.record(sha256=sha, filename=img.name, model_output={}, model_flagged=False, verdict="confirm",
                   moderator=who, labels=labels, path=str(img), item_id="m1", note="-1 +1 @x",
                   checkpoint_digest="d" * 64, seen={"probability": 0.2, "threshold": 0.5, "preset": "balanced"},
                   signed_in=True)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        log.conn.execute("UPDATE reviews SET verdict = 'override: flag'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        log.conn.execute("DELETE FROM reviews")
    rep = export_reviews(log, tmp_path / "only-rita.jsonl", users=["rita"])
    assert rep.reviewers == ["rita"] and rep.written == 1
    with pytest.raises(ValueError, match="no queue verdicts by"):
        export_reviews(log, tmp_path / "future.jsonl", since=parse_time("2999-01-01"))
    assert export_reviews(log, tmp_path / "past.jsonl", until=parse_time("2999-01-01")).written == 1
    # the CLI: --user, --since, --until; a bad time is a usage error
    assert main(["reviews", "export", "--out", str(tmp_path / "cli.jsonl"), "--review-log", str(tmp_path / "r.sqlite"),
                 "--user", "adam", "--since", "2000-01-01", "--until", "2999-01-01"]) == 0
    assert json.loads((tmp_path / "cli.jsonl").read_text())["reviewers"] == ["adam"]
    assert main(["reviews", "export", "--out", str(tmp_path / "x.jsonl"), "--review-log", str(tmp_path / "r.sqlite"),
                 "--since", "yesterday"]) == 2
    # the demo's CSV of the whole log is inert in a spreadsheet
    log.export_csv(tmp_path / "all.csv")
    for r in csv.DictReader((tmp_path / "all.csv").open()):
        assert r["note"] == "'-1 +1 @x"


def test_a_dhumor_manifest_csv_is_inert(tmp_path, dhumor_fixture):
    from dhumor.images import sha256_bytes
    from dhumor.review.log import ReviewLog
    from dhumor.review.export import export_reviews

    log = ReviewLog(tmp_path / "r.sqlite")
    img = sorted(p for p in dhumor_fixture.parent.rglob("*") if p.suffix in (".png", ".jpg"))[0]
    log.record(sha256=sha256_bytes(img.read_bytes()), filename=img.name, model_output={}, model_flagged=False,
               verdict="confirm", moderator="rita", path=str(img), caption="=HYPERLINK(\"http://e\")", note=NOTE,
               labels={"humor": "no", "target": None, "intensity": None})
    export_reviews(log, tmp_path / "m.csv")
    row = next(csv.DictReader((tmp_path / "m.csv").open()))
    assert row["Text"].startswith("'=") and row["note"].startswith("'=")


def test_a_decompression_bomb_or_a_non_image_is_the_rows_error(team, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb, optimize=True)  # 144 Mpx in a few kB
    assert bomb.stat().st_size < 0.5 * 2**20
    fake = tmp_path / "fake.png"
    fake.write_text("<html>not an image</html>")
    rita = _client(team, "rita")
    for f in (bomb, fake):
        out = rita.predict(handle_file(str(f)), 0.5, api_name="/analyze")
        assert out[-1].startswith("**Cannot use this file:**"), out[-1]
    out = rita.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/analyze")  # and the demo goes on
    assert out[-1].startswith("Scored in")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(2**20))  # over the demo's 0.5 MB cap: refused at the upload
    s = _session(team, "rita")
    r = s.post(team["url"] + "gradio_api/upload", files={"files": ("big.png", big.read_bytes())}, timeout=30)
    assert r.status_code == 413


def test_user_names_that_differ_only_in_case_are_refused(tmp_path):
    """`ana` and `ANA` would be two people to the demo and one to a reader of the audit trail."""
    import json as _json

    from dhumor.app.auth import Users, add_user
    from dhumor.errors import ConfigError

    users = tmp_path / "users.json"
    assert add_user(users, "ana", "long-enough-pw", role="admin")
    with pytest.raises(ConfigError, match="differ only in letter case"):
        add_user(users, "ANA", "long-enough-pw")
    data = _json.loads(users.read_text())
    data["users"]["ANA"] = dict(data["users"]["ana"], role="reviewer")  # a hand-edited file
    users.write_text(_json.dumps(data))
    with pytest.raises(ConfigError, match="differ only in letter case"):
        Users.load(users)
    # a linked users file: the file the demo reads gets the new user, the link stays a link
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    add_user(real, "rui", "long-enough-pw")
    link.symlink_to(real)
    add_user(link, "eva", "long-enough-pw")
    assert link.is_symlink() and set(Users.load(real).users) == {"rui", "eva"}
