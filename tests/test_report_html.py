"""report.html: one self-contained page with the tables, the plots and what RLP rewarded, all text escaped."""

import base64
import json
import re
from html.parser import HTMLParser

from typer.testing import CliRunner

from rlp_cli import report as R
from rlp_cli.report.records import Sample, Thought
from rlp_cli.report.rewarded import rewarded_thoughts, split_phases
from test_report import results  # noqa: F401  (the synthetic results folder)

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base", "embed", "param", "track"}
EVIL = '<script>alert("x")</script> & </pre>'


class StrictParser(HTMLParser):
    """Every element closed in order, nothing left open; collects the tags and their attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.errors, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(text):
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    return parser


def _samples(folder):
    """Five logged steps of a dense-reward run; the best early thought is hostile markup."""
    lines = []
    for step, rewards in ((1, [0.9, -0.4]), (5, [0.1, 0.2]), (10, [0.0, 0.0]), (15, [0.3, -1.5]), (20, [1.2, 0.7])):
        thoughts = [{"thought": EVIL if step == 1 and i == 0 else f"thought {step}.{i}", "tokens": 16,
                     "closed": False, "reward": r, "s_pred": -1.0 + r} for i, r in enumerate(rewards)]
        lines.append({"step": step, "context_tail": "Question: 2 < 3?\nAnswer: ", "target": " yes", "position": 9,
                      "s_ema": -1.0, "thoughts": thoughts, "s_empty": -1.3})
    (folder / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 25, "thou')


def test_html_report_is_one_self_contained_page(results):  # noqa: F811
    _samples(results / "rollouts" / "g4_s0-aaaa0000")
    out = R.make_report(results, paper=True)
    page = results / "report.html"
    assert page in out["written"]
    text = page.read_text()
    parser = _parse(text)

    # the tables, their marks and legend, the paper's rows
    assert "Rollouts G" in text and "42.0 ± 2.0" in text and "Problem by problem" not in text
    assert '<td class="noise">+1.0~</td>' in text  # g2 vs base: within seed noise
    assert '<td class="untested">+10.0?</td>' in text  # nested/bare: one run a side, not testable
    assert "Marks after a change" in text and "not testable" in text
    assert "Published numbers for the same axis" in text
    assert "RuntimeError: out of memory" in text  # the failed run is listed

    # plots embedded as PNG data URIs, nothing fetched from anywhere
    images = [attrs["src"] for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == 4
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for tag, attrs in parser.tags:
        assert tag not in ("script", "link", "iframe", "object")
        for name in ("src", "href"):
            assert not re.match(r"\s*(https?:)?//", attrs.get(name) or ""), (tag, attrs)
    assert not re.search(r"https?://", text) and "@import" not in text and "url(" not in text

    # What RLP rewards: early (steps 1, 5) and late (15, 20), the best and the worst thought of each, escaped
    section = text[text.index("What RLP rewards"):]
    assert "<script" not in text
    assert html_escaped(EVIL) in section
    assert "steps 1, 5" in section and "steps 15, 20" in section
    late = section[section.index("steps 15, 20"):]
    assert "thought 20.0" in late and "thought 15.1" in late  # +1.2 highest, -1.5 lowest
    assert late.index("thought 20.0") < late.index("thought 15.1")
    assert "+1.200" in late and "-1.500" in late and "&quot; yes&quot;" in late  # the target, quoted
    assert "Question: 2 &lt; 3?" in section
    assert EVIL in "".join(parser.text)  # the page shows the text the model wrote, as text


def html_escaped(s):
    import html

    return html.escape(s, quote=True)


def test_rewarded_thoughts_early_and_late():
    def sample(step, *rewards, prediction=None):
        return Sample(step, "ctx", "x", 1, None, None,
                      [Thought(f"t{step}.{i}", reward=r, prediction=prediction) for i, r in enumerate(rewards)])

    assert split_phases([]) == [] and [n for n, _ in split_phases([sample(1, 0.5)])] == ["early"]
    samples = [sample(s, 0.0, 1.0, prediction="7") for s in (1, 5, 10, 15)] + [sample(20, 0.0, 0.0)]
    phases = rewarded_thoughts(samples)
    assert [(p.name, p.steps) for p in phases] == [("early", [1, 5]), ("late", [15, 20])]
    early = phases[0].picks
    assert [p.label for p in early] == ["highest reward", "lowest reward"]
    assert early[0].thought.text == "t1.1" and early[1].thought.text == "t1.0"  # the earliest on ties
    only_zero = rewarded_thoughts([sample(20, 0.0, 0.0)])[0]
    assert [p.label for p in only_zero.picks] == ["every thought"] and only_zero.n_thoughts == 2
    assert rewarded_thoughts([sample(3, None)])[0].picks == []


def test_samples_of_the_real_format_are_read(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"step": 5, "context_tail": "a", "target": "1", "position": 16, "s_ema": None,
                                "thoughts": [{"thought": " 36", "tokens": 16, "closed": False, "reward": 1.0,
                                              "prediction": "1"}, "junk"]}) + "\n" + '["not a record"]\n')
    (sample,) = R.read_samples(path)
    assert sample.step == 5 and sample.s_ema is None and len(sample.thoughts) == 1
    assert sample.thoughts[0].prediction == "1" and sample.thoughts[0].s_pred is None


def test_the_command_writes_the_page_and_prints_its_link(results):  # noqa: F811
    from rlp_cli.cli import app

    res = CliRunner().invoke(app, ["report", str(results), "--no-plots"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    page = results / "report.html"
    assert page.exists() and page.resolve().as_uri() in res.output.replace("\n", "")
    assert "<img" not in page.read_text()  # no plots asked for
    page.unlink()
    res = CliRunner().invoke(app, ["report", str(results), "--format", "md", "--no-plots"])
    assert res.exit_code == 0 and not page.exists() and "file://" not in res.output
