"""HTML reports without a browser: content, escaping, size, errors, PNGs and the tour.

The browser checks (figures render, dropdowns work, no network) are in test_browser.py.
"""

from __future__ import annotations

import doctest
import json
import re
import time

import numpy as np
import pytest
from plotly.offline import get_plotlyjs

import qkov
import qkov.report
from qkov.cli import main
from qkov.report import data as report_data
from qkov.report import figures, gather, sections, write_report
from qkov.tour import tour

MAX_STEPS, ADD_STEPS = 200, 30

EVIL = "<script>window.__qkov_pwned = 1</script>"


@pytest.fixture(scope="module")
def max_run(short_trained):
    return short_trained("max", MAX_STEPS)


@pytest.fixture(scope="module")
def max_report(max_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "max.html"
    t0 = time.perf_counter()
    write_report(max_run.path, out=out)
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def max_data(max_run):
    return gather(max_run)


@pytest.fixture(scope="module")
def add_data(short_trained):
    return gather(short_trained("add", ADD_STEPS))


def _findings_in_page(page: str) -> list[tuple[str, float, str]]:
    items = re.findall(r'<li class="finding" data-id="([^"]+)" data-value="([^"]+)">([^<]*)</li>', page)
    return [(i, float(json.loads(v.replace("&quot;", '"'))), t) for i, v, t in items]


def test_round_sig_and_rel_doctests():
    assert doctest.testmod(report_data).failed == 0
    x = np.array([0.000123456, -98.7654, 3.0])
    assert report_data.round_sig(x).tolist() == [0.0001235, -98.77, 3.0]
    assert report_data.round_rel(x).tolist() == [0.0, -98.77, 3.0]


def test_max_report_is_small_fast_and_offline(max_report):
    out, seconds = max_report
    page = out.read_text()
    size = out.stat().st_size
    assert size < 10e6, f"report is {size / 1e6:.1f} MB"
    assert seconds < 15, f"report took {seconds:.1f} s (target 5 s on an idle machine)"
    assert page.count("plotly.js v") == 1                      # plotly.js embedded once
    html_only = page.replace(get_plotlyjs(), "")                 # plotly.js's own code holds URL strings
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:|//|ftp:|wss?:)""", html_only, re.I)
    assert not re.search(r"<(link|iframe|img|object|embed)\b", html_only) and "@import" not in html_only
    # every figure has its container and its JSON
    ids = re.findall(r'<div class="qkov-figure" id="([^"]+)"', page)
    assert len(ids) == len(set(ids)) >= 9
    for fid in ids:
        assert f'id="{fid}-json"' in page


def test_max_report_sections_and_findings(max_run, max_report):
    out, _ = max_report
    page = out.read_text()
    summary = qkov.analyze(max_run.model, max_run.task).to_dict()
    got = _findings_in_page(page)
    assert [(i, v) for i, v, _ in got] == [(f["id"], f["value"]) for f in summary["findings"]]
    assert [t for _, _, t in got] == [f["text"] for f in summary["findings"]]
    for sid in ("findings", "model-card", "attention", "qk", "ov", "direct-path"):
        assert f'<section id="{sid}">' in page
    for absent in ("composition", "detectors", "mlp", "fourier"):   # a 1-layer attention-only model
        assert f'<section id="{absent}">' not in page
    for fid in ("fig-training-curves", "fig-eval-by-length", "fig-attention-0-0", "fig-qk-0-0",
                "fig-qk-positions-0-0", "fig-positional-qk-0-0", "fig-ov-0-0", "fig-eigenvalues-0-0"):
        assert f'id="{fid}"' in page


def test_gather_draws_the_circuits(max_run, max_data):
    d = max_data
    h = d.heads[0]
    model = max_run.model
    dense = qkov.circuits.full_qk(model, 0, 0, 5, 3).AB.double().numpy()
    np.testing.assert_allclose(h.qk_pairs[(5, 3)], dense, atol=5e-3 * np.abs(dense).max())   # 3 digits
    ov = qkov.circuits.full_ov(model, 0, 0).AB.double().numpy()
    np.testing.assert_allclose(h.ov, ov, atol=5e-3 * np.abs(ov).max())
    assert set(h.qk_pairs) == {(q, k) for q in range(6) for k in range(q + 1)}
    assert h.qk_default == (5, 5)
    assert d.examples[0].labels[0].startswith("(0) ")
    assert h.eigenvalues.shape == (32,)                           # d_head non-trivial eigenvalues
    # the dropdown carries every pair and starts on the default one
    fig = figures.full_qk_positions(h, d.token_labels)
    menu = fig.layout.updatemenus[0]
    assert len(menu.buttons) == 21 and menu.buttons[menu.active].label == "query pos 5, key pos 5"
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), h.qk_pairs[(5, 5)])


def test_labels_and_titles_are_escaped(max_run, tmp_path):
    labels = [EVIL if i == 3 else f"<b>{i}</b>" if i == 4 else str(i) for i in range(64)]
    out = write_report(max_run, out=tmp_path / "evil.html", token_labels=labels, title='<img src=x onerror="alert(1)">')
    page = out.read_text()
    assert EVIL not in page and "<b>4</b>" not in page and "<img" not in page
    assert "&lt;img src=x" in page                               # the title shows as text
    # inside figure JSON the label is plotly-escaped text, and no "<" can close the script tag
    assert "&lt;script&gt;window.__qkov_pwned" in page.replace("\\u0026", "&")


def test_add_report_has_mlp_sections(add_data):
    d = add_data
    assert d.mlp is not None and d.mlp.neuron_inputs.shape == (2, 128, 128)
    names = {s.id: [n for n, _ in s.figures] for s in sections(d)}
    assert names["mlp"] == ["neuron-inputs", "neuron-picker", "neuron-logits"]
    assert names["fourier"] == ["spectrum"]
    assert "composition" not in names
    picker = figures.neuron_picker(d.mlp, d.token_labels)
    assert len(picker.layout.sliders[0].steps) == 128
    seventh = picker.layout.sliders[0].steps[7].args[0]["y"][0]
    np.testing.assert_array_equal(np.asarray(seventh), d.mlp.token_inputs[:, 7])


def test_two_layer_model_has_composition_and_detectors(tmp_path):
    task = qkov.get_task("induction", n_ctx=12, min_seg=2, max_seg=6)
    run = qkov.train(task, train_config=task.train_config().replace(steps=2, eval_every=1), quiet=True)
    out = write_report(run, out=tmp_path / "induction.html")
    page = out.read_text()
    for sid in ("composition", "detectors"):
        assert f'<section id="{sid}">' in page
    assert 'id="fig-qk-positions-1-1"' in page


def test_modadd_report_draws_progress_measures(tmp_path):
    task = qkov.get_task("modadd", p=7)
    run = qkov.train(task, out=tmp_path / "run", quiet=True,
                     train_config=task.train_config().replace(steps=20, checkpoint_every=10, eval_every=10))
    d = gather(run)
    ids = [n for s in sections(d) for n, _ in s.figures]
    assert "progress" in ids
    assert d.out_labels == [str(i) for i in range(7)] and d.token_labels[-1] == "="


def test_in_memory_run_needs_an_output_path(tmp_path):
    run = qkov.train("max", train_config=qkov.get_task("max").train_config().replace(steps=2), quiet=True)
    with pytest.raises(qkov.QkovError, match="out=PATH"):
        write_report(run)
    assert write_report(run, out=tmp_path / "r.html").is_file()


def test_cli_report_writes_and_refuses_bad_input(max_run, tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(max_run.path), "-o", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    # a missing run directory: one line, exit 2, nothing written
    assert main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qkov: ") and "does not exist" in err
    assert not (tmp_path / "x.html").exists()
    # a folder as the output file
    assert main(["report", str(max_run.path), "-o", str(tmp_path)]) == 2
    assert "a folder is in the way where a file should be" in capsys.readouterr().err
    # a run directory without a model
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((max_run.path / "config.json").read_text())
    assert main(["report", str(broken)]) == 2
    assert not (broken / "report.html").exists()
    assert not list(tmp_path.rglob(".*.tmp"))                 # no temporary files left behind


def test_png_figures(max_run, tmp_path):
    pytest.importorskip("matplotlib")
    out = write_report(max_run, out=tmp_path / "r.html", png=tmp_path / "png")
    pngs = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    page = out.read_text()
    assert len(pngs) == page.count('class="qkov-figure"')
    assert {"qk-positions-0-0.png", "ov-0-0.png", "attention-0-0.png"} <= set(pngs)
    for p in (tmp_path / "png").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


@pytest.mark.slow
def test_tour_trains_then_reuses(tmp_path):
    result = tour(tmp_path / "tour", steps=20, quiet=True, tasks=("max", "add", "fib"))
    assert [x.task for x in result.entries] == ["max", "add", "fib"]
    assert not any(x.reused for x in result.entries)
    index = result.index.read_text()
    shared = tmp_path / "tour" / "plotly.min.js"
    assert shared.read_text() == get_plotlyjs()                # plotly.js once, beside the pages
    for x in result.entries:
        assert x.report.is_file()
        assert f'href="{x.task}/report.html"' in index
        page = x.report.read_text()
        assert "plotly.js v" not in page and '<script type="text/javascript" src="../plotly.min.js">' in page
        thumb = x.path / "thumbnail.png"                       # the model's key figure, small
        assert thumb.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 200 < thumb.stat().st_size < 50_000
        assert f'<img class="thumb" src="{x.task}/thumbnail.png"' in index
        for f in x.summary["findings"]:
            assert qkov.report.html.e(f["text"]) in index
    assert result.frequency_overlap is not None and 0 <= result.frequency_overlap <= 1
    assert f"{100 * result.frequency_overlap:.2f}%" in index
    again = tour(tmp_path / "tour", steps=20, quiet=True, tasks=("max", "add", "fib"))
    assert all(x.reused for x in again.entries)
    # a run with another setup in the tour folder is never overwritten
    with pytest.raises(qkov.QkovError, match="different setup"):
        tour(tmp_path / "tour", steps=21, quiet=True, tasks=("max",))


def test_cli_tour_refuses_a_file_as_its_folder(tmp_path, capsys):
    target = tmp_path / "notadir"
    target.write_text("x")
    assert main(["tour", "-o", str(target), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err
    assert target.read_text() == "x"


# ----------------------------------------------------------------- inputs, rough edges
WALKTHROUGH = ["52 59", "46 41 41", "35 14 47 61 38 54"]


def test_report_draws_the_given_inputs(max_run, tmp_path, capsys):
    out = tmp_path / "inputs.html"
    summary = qkov.analyze(max_run.model, max_run.task).to_dict()
    assert main(["report", str(max_run.path), "-o", str(out), "--inputs", *WALKTHROUGH]) == 0
    capsys.readouterr()
    d = gather(max_run, inputs=WALKTHROUGH, summary=summary)
    assert [ex.text for ex in d.examples] == WALKTHROUGH and [ex.output for ex in d.examples] == ["59", "46", "61"]
    assert [ex.patterns.shape for ex in d.examples] == [(1, 1, 2, 2), (1, 1, 3, 3), (1, 1, 6, 6)]
    fig = figures.attention_patterns(d.examples, 0, 0)
    assert [a.text for a in fig.layout.annotations] == ["52 59 → 59", "46 41 41 → 46", "35 14 47 61 38 54 → 61"]
    assert "52 59 \\u2192 59" in out.read_text()                 # the same captions on the page
    assert "inputs given to the report" in out.read_text()


def test_report_refuses_a_bad_input(max_run, tmp_path, capsys):
    out = tmp_path / "bad.html"
    assert main(["report", str(max_run.path), "-o", str(out), "--inputs", "52 59", "52 x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input '52 x': 'x' is not a number" in err
    assert not out.exists()


def test_default_max_examples_have_several_lengths(max_data):
    assert [len(ex.tokens) for ex in max_data.examples] == [2, 3, 5, 6]


def test_positional_qk_masks_keys_after_the_query(max_data):
    h = max_data.heads[0]
    pq = h.positional_qk                                        # [query pos, key pos]
    upper = np.triu(np.ones_like(pq, dtype=bool), 1)
    assert np.isnan(pq[upper]).all() and np.isfinite(pq[~upper]).all()
    spec = figures.figure_dict(figures.positional_qk(h))
    assert json.loads(qkov.report.html.script_json(spec))["data"][0]["z"][0][1] is None   # blank on the page


def test_eigenvalue_plot_is_as_wide_as_the_others(max_data):
    h = max_data.heads[0]
    eig, ov = figures.eigenvalues(h), figures.full_ov(h, [], [])
    assert eig.layout.width is None and ov.layout.width is None        # both fill the page's width
    assert eig.layout.yaxis.scaleanchor == "x"                         # the complex plane stays round


def test_text_says_what_is_true_of_each_model(max_data, add_data):
    by_id = lambda d: {s.id: s.explain for s in sections(d)}  # noqa: E731
    mx = by_id(max_data)
    assert "1 layer, 1 attention head, no MLP" in mx["model-card"]
    assert "With one head and no MLP" in mx["ov"] and "rank correlation" in mx["qk"]
    add = by_id(add_data)
    assert "1 layer, 1 attention head and an MLP of 128 ReLU neurons" in add["model-card"]
    assert "With one head and no MLP" not in add["ov"] + add["attention"]
    assert "through the MLP's neurons" in add["ov"] and "the attention head's OV circuit" in add["mlp"]
    task = qkov.get_task("modadd", p=7)
    run = qkov.train(task, quiet=True, train_config=task.train_config().replace(steps=2))
    mod = by_id(gather(run))
    assert "1 layer of 4 attention heads and an MLP of 512 ReLU neurons" in mod["model-card"]
    assert "the 4 heads' OV circuits together" in mod["mlp"] and "With one head" not in mod["ov"]


def test_neuron_picker_starts_on_the_cleanest_neuron(short_trained, add_data):
    from qkov.fourier import neuron_input_spectrum

    run, d = short_trained("add", ADD_STEPS), add_data
    s = neuron_input_spectrum(run.model, n_tokens=128)
    best = int((s.dominant_share * (1 - s.linear_share)).argmax())
    assert d.mlp.first_neuron == best
    picker = figures.neuron_picker(d.mlp, d.token_labels)
    assert picker.layout.sliders[0].active == best
    np.testing.assert_array_equal(np.asarray(picker.data[0].y), d.mlp.token_inputs[:, best])
    assert f"neuron {best} " in picker.layout.title.text


def test_progress_measures_give_the_gini_coefficient_its_own_axis():
    rows = [{"step": s, "train_loss": 1.0 / (s + 1), "test_loss": 2.0, "sum_sq_weights": 900.0 - s,
             "gini_embed_fourier": 0.2 + s / 1000} for s in range(0, 500, 100)]
    fig = figures.progress_measures(rows)
    traces = {t.name: t for t in fig.data}
    weights, gini = traces["sum of squared weights"], traces["Gini of W_E's Fourier norms (right axis)"]
    assert weights.yaxis != gini.yaxis and weights.xaxis == gini.xaxis
    axis = fig.layout[f"yaxis{gini.yaxis[1:]}"]
    assert axis.rangemode == "tozero" and axis.overlaying == weights.yaxis and axis.side == "right"


def test_key_figure_thumbnail(max_data, add_data, tmp_path):
    from qkov.report.sections import key_figure
    from qkov.report.thumbnail import thumbnail_png

    assert key_figure(sections(add_data))[0] == "neuron-picker"
    name, fig = key_figure(sections(max_data))
    assert name == "qk-positions-0.0"
    thumb = tmp_path / "t.png"
    thumb.write_bytes(thumbnail_png(fig))
    assert thumb.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    matplotlib = pytest.importorskip("matplotlib.image")
    img = matplotlib.imread(thumb)                               # a real PNG: keys to the right score higher
    assert img.shape[0] == img.shape[1] >= 128
    assert img[:, -4:, 0].mean() > img[:, :4, 0].mean() and img[:, :4, 2].mean() > img[:, -4:, 2].mean()


@pytest.mark.slow
@pytest.mark.parametrize("name,sets", [
    ("max", {}), ("add", {}), ("fib", {}), ("induction", {}),
    # modadd at the reference shape (p = 113, 4 heads, 512 neurons, checkpoints every 1,000
    # steps): the page's size is set by the shapes, so 3,000 of its 25,000 steps stand in for them
    ("modadd", {"steps": 3000}),
])
def test_every_reference_report_is_under_10_mb(trained, tmp_path, name, sets):
    run = trained(name, **sets)
    out = write_report(run, out=tmp_path / f"{name}.html")
    size = out.stat().st_size
    print(f"{name}: {size / 1e6:.2f} MB")
    assert size < 10e6, f"the {name} report is {size / 1e6:.1f} MB"
