"""The run report: a static page, readable offline, with curves drawn as inline SVG and sample
completions (escaped). A real headless Chromium renders a real tiny run's report: the charts
must show in the screenshot, and the browser's own parse must hold every chart and sample."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from rlhf.cli import main
from rlhf.errors import UserError
from rlhf.report import PALETTE, chart_series, nice_ticks, svg_chart, tick_label, write_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=alert(1)> & \"quotes\""


def fake_run(tmp_path, recipe: dict, metrics: list[dict], samples: list[dict] = ()) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if samples:
        (run / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return run


def sample(step: int, completion: str = "42") -> dict:
    return {"step": step, "prompt": "user: What is 40 + 2?", "completion": completion, "reward": 1.0,
            "rewards": {"arith_correct": 1.0}, "advantage": 0.5, "length": 2, "truncated": False}


# ------------------------------------------------------------------------------ the page itself
def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 1) == [0, 0.5, 1.0]                     # raw step 0.25 -> the next of 1, 2, 5 x 0.1
    assert nice_ticks(-0.03, 0.0) == [-0.03, -0.02, -0.01, 0.0]
    assert nice_ticks(1, 3, 6, min_step=1) == [1, 2, 3]          # steps: whole numbers
    assert nice_ticks(0.2, 9.7) == [0, 5, 10]                    # raw 2.375 -> 5
    assert tick_label(5.69645, [5.69645, 5.6965]) == "5.69645" and tick_label(2.0, [0, 5, 10]) == "2"


def test_a_chart_maps_steps_and_values_onto_its_frame():
    svg = svg_chart("reward", {"reward": [(1, 0.0), (3, 1.0)]})
    (points,) = re.findall(r'<polyline points="([^"]+)"', svg)
    # frame: x from 58 to 440 - 12 = 428; y ticks 0..1 span 230 - 34 = 196 (value 0) up to 30 (value 1)
    assert points == "58.0,196.0 428.0,30.0"
    # a missing value breaks the line in two
    svg = svg_chart("kl", {"kl": [(1, 0.0), (2, None), (3, 1.0), (4, 0.5)]})
    assert len(re.findall("<polyline", svg)) == 2
    assert svg_chart("empty", {"kl": [(1, None)]}) == ""


def test_lm_charts_follow_the_brief_and_draw_each_reward_function():
    rows = [{"step": s, "reward": 0.1 * s, "rewards/arith_correct": 0.1 * s, "rewards/all_none": 0.0,
             "rewards/slow/timeouts": 0.0, "kl": 0.01 * s, "completion_len": 10, "entropy": 2.0, "clip_frac": 0.0,
             "time/step_s": 1.0} for s in (1, 2)]
    charts = dict(chart_series(rows, gym=False))
    assert list(charts) == ["reward", "KL to the reference", "completion length (tokens)", "entropy", "clip fraction"]
    assert list(charts["reward"]) == ["reward", "rewards/arith_correct"]  # not all_none, not timeouts
    assert charts["reward"]["reward"] == [(1, 0.1), (2, 0.2)]


def test_gym_charts_start_with_the_return_then_every_other_number():
    rows = [{"step": 100 * s, "time_s": 1.0, "return": 10.0 * s, "episodes": s, "ep_length": 9.0,
             "losses/td": 0.5, "charts/epsilon": 0.1} for s in (1, 2)]
    titles = [t for t, _ in chart_series(rows, gym=True)]
    assert titles == ["return (mean of the last 100 episodes)", "episode length", "losses/td", "charts/epsilon"]


def test_the_page_escapes_what_a_model_wrote_and_needs_nothing_outside_the_file(tmp_path):
    run = fake_run(tmp_path, {"algo": "grpo", "model": "m", "steps": 9},
                   [{"step": s, "reward": s / 9} for s in range(1, 10)],
                   [sample(s, HOSTILE) for s in (1, 5, 9) for _ in range(6)])
    page = write_report(run).read_text()
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;" in page
    # offline: no scripts, stylesheets, images or fonts fetched (the only URL is SVG's namespace)
    assert not re.search(r"<[^>]*\b(src|href)=", page)  # (the escaped sample holds "src=" as text)
    assert set(re.findall(r"https?://[^\s\"']+", page)) == {"http://www.w3.org/2000/svg"}
    # samples of the start, middle and end, four of each
    assert re.findall(r"<h3>(\w+): step (\d+)</h3>", page) == [("start", "1"), ("middle", "5"), ("end", "9")]
    assert page.count("<tr><td") == 12


def test_samples_shown_come_from_different_prompts_first():
    from rlhf.report import spread

    rows = [{"prompt": p, "i": i} for i, p in enumerate("aaabbbcc")]
    assert [r["i"] for r in spread(rows)] == [0, 3, 6, 1, 4, 7, 2, 5]


def test_rlhf_report_writes_the_page_and_refuses_a_directory_without_a_run(tmp_path, capsys):
    run = fake_run(tmp_path, {"algo": "ppo", "env": "CartPole-v1"}, [{"step": 64, "return": 9.0}])
    assert main(["report", str(run)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"report": str(run / "report.html")}
    assert "return (mean of the last 100 episodes)" in (run / "report.html").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(UserError):
        write_report(tmp_path / "missing")


# ------------------------------------------------------------------------------ a real browser
def chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium): the page is "
                    "checked in a real browser only where one is installed")
def test_a_real_runs_report_renders_its_charts_and_samples_in_chromium(tiny_model, tmp_path, capsys):
    from PIL import Image

    run = tmp_path / "run"
    tiny = ["steps=3", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "lora_r=2", "lora_alpha=4",
            "threads=1", "rewards=[arith_correct, length_penalty]", "log_completions_every=1"]
    assert main(["train", "grpo_arith", "--run-dir", str(run), "--no-progress", "--set", f"model={tiny_model}",
                 *[x for t in tiny for x in ("--set", t)]]) == 0
    capsys.readouterr()
    page = run / "report.html"
    n_charts = page.read_text().count("<svg")
    assert n_charts >= 5  # reward, KL, length, entropy, clip fraction at least

    # the browser's own parse: every chart keeps its lines (a malformed tag would swallow them),
    # every sample row is there and its text stayed text
    dom = chromium(page, tmp_path, "--dump-dom").stdout
    assert dom.count("<svg") == n_charts and dom.count("<polyline") >= n_charts
    assert len(re.findall(r"<line [^>]*></line>", dom)) >= 3 * n_charts  # grid lines closed, nothing inside
    assert dom.count('<td class="text">') == 2 * 3 * 4  # prompt + completion, steps 1, 2, 3, four samples each

    shot = tmp_path / "report.png"
    out = chromium(page, tmp_path, "--window-size=1400,3000", f"--screenshot={shot}")
    assert shot.is_file(), out.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)  # [H, W, 3]
    assert img.shape == (3000, 1400, 3)
    # the first series' colour is drawn: about 270 px of line per chart at 1.8 px width; a third
    # of that per chart rules out blank charts whatever the anti-aliasing
    blue = np.array([int(PALETTE[0][i:i + 2], 16) for i in (1, 3, 5)])
    near = int((np.abs(img - blue).sum(-1) < 60).sum())
    assert near > 90 * n_charts, (near, n_charts)
    # text below the charts: the sample tables (dark pixels in the lower half of the page)
    assert int((img[1500:].max(-1) < 90).sum()) > 2000


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_a_completion_holding_markup_stays_text_in_chromium(tmp_path):
    run = fake_run(tmp_path, {"algo": "grpo", "model": "m", "steps": 2}, [{"step": s, "reward": 0.5} for s in (1, 2)],
                   [sample(s, HOSTILE) for s in (1, 2)])
    dom = chromium(write_report(run), tmp_path, "--dump-dom").stdout
    assert "<title>rlhf report: run</title>" in dom  # the sample's script did not run
    assert "<script" not in dom and "<img" not in dom and dom.count("&lt;script&gt;document.title") == 2
