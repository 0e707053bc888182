"""The bodies of a candidate notification: a generic JSON document and a Slack-compatible one.

Generic: one object with the candidate, the gate verdict and its numbers, and ``url`` (the
candidate's approval page). Slack: an incoming-webhook message (``text`` for notifications and
clients without blocks, plus ``blocks``); Mattermost and Rocket.Chat accept the same ``text``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from patchd.promotion.component import Candidate

EVENT_BY_VERDICT = {"pass": "awaiting_approval", "fail": "fail", "inconclusive": "inconclusive"}


@dataclass(frozen=True)
class Notice:
    """One notification: what happened to which candidate, and where a person looks at it."""

    event: str  # awaiting_approval | fail | inconclusive
    candidate: Candidate
    url: str


def generic(notice: Notice) -> dict[str, Any]:
    c = notice.candidate
    body: dict[str, Any] = {
        "event": f"candidate.{notice.event}",
        "candidate": c.id,
        "model": c.model,
        "digest": c.digest,
        "parent": c.parent,
        "run_id": c.run_id,
        "state": c.state.value,
        "verdict": c.verdict,
        "expires_at": c.expires_at,
        "url": notice.url,
    }
    if c.gate is not None:
        g = c.gate
        body["reasons"] = list(g.reasons)
        body["worst_group"] = {
            "cell_before": g.incumbent_worst[0],
            "cell_after": g.candidate_worst[0],
            "before": g.incumbent_worst[1],
            "after": g.candidate_worst[1],
            "delta": g.worst_group_delta,
            "interval": list(g.worst_group_interval),
        }
        body["average"] = {
            "before": g.incumbent_avg,
            "after": g.candidate_avg,
            "delta": g.avg_delta,
            "interval": list(g.avg_interval),
        }
    return body


def _esc(text: str) -> str:
    """Slack mrkdwn needs only &, < and > escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pp(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} pp"


HEADLINE = {
    "awaiting_approval": "awaits approval",
    "fail": "failed the gate",
    "inconclusive": "is inconclusive (never promoted)",
}


def summary(notice: Notice) -> str:
    """One line: the candidate, what happened, the worst-group and average moves."""
    c = notice.candidate
    line = f"patchd: candidate {c.id} of {c.model} {HEADLINE[notice.event]}"
    if c.gate is not None:
        g = c.gate
        line += (
            f": worst group {_pct(g.incumbent_worst[1])} -> {_pct(g.candidate_worst[1])}"
            f" ({_pp(g.worst_group_delta)}), average {_pct(g.incumbent_avg)} -> "
            f"{_pct(g.candidate_avg)} ({_pp(g.avg_delta)})"
        )
    return line


def slack(notice: Notice) -> dict[str, Any]:
    c = notice.candidate
    reasons = list(c.gate.reasons) if c.gate is not None else []
    text = f"{_esc(summary(notice))} <{notice.url}|open>"
    detail = "\n".join(f"• {_esc(r)}" for r in reasons) or "_no gate reasons recorded_"
    return {
        "text": text,
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": f"*<{notice.url}|Candidate {_esc(c.id)}>* of *{_esc(c.model)}* "
                    f"{HEADLINE[notice.event]}\n{detail}",
                },
            },
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"verdict `{c.verdict}` · digest `{c.digest[:12]}` · "
                        f"run `{_esc(c.run_id)}`",
                    }
                ],
            },
        ],
    }


def body(notice: Notice, fmt: str) -> dict[str, Any]:
    return slack(notice) if fmt == "slack" else generic(notice)
