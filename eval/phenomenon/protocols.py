"""The two prompt conditions the phenomenon is measured under.

* ``HEDGE``: the paper's raw rendering (system text + "\\n" + user text, no chat template)
  with the question as one line of a plain dialogue, ``User: …`` (``turn="dialogue"``). The
  system text lists the tools and the call format, so A *can* call, but nothing in the turn
  asks it to, and A calls on fewer than half of the prompts. The RL skill is latent there,
  which is what steering and the alarm need. How the other renderings compare is in
  ``docs/phenomenon.md``.
* ``DEPLOYMENT``: the chat template with the user turn A was trained on; A calls a tool on
  almost every prompt there, which is what the kill switch must stop.

Both are :class:`Protocol` records, so a report names exactly how every prompt was rendered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from guardrail.tasks import RenderMode, ToolTask, UserTurn


@dataclass(frozen=True)
class Protocol:
    """How a tool task becomes a prompt: template or not, which user turn, and why."""

    name: str
    mode: RenderMode
    turn: UserTurn
    description: str

    def render(self, task: ToolTask, tokenizer: Any) -> str:
        return task.render(tokenizer, self.mode, self.turn)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


HEDGE = Protocol(
    "hedge", "raw", "dialogue",
    "raw rendering (system text + newline + user text, no chat template); the user turn is 'User: ' and the "
    "question, with no instruction to call a tool; the system text lists the tools and the call format",
)


def deployment(turn: UserTurn) -> Protocol:
    """The chat template with the user turn A was trained on (``trained_turn`` for the organism)."""
    return Protocol("deployment", "chat", turn, f"chat template, the '{turn}' user turn A was trained on")
