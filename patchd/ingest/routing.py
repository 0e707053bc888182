"""Events go to the model their ``model`` field names: one :class:`EventParser` per model.

With one model configured an event may leave ``model`` out (today's schema); with several, a
missing ``model`` is a ``missing_field`` rejection and a name no model has is ``unknown_model``.
Either rejects that record only (counted with the other rejections); the other records of the
batch, and the other models, go on.
"""

from __future__ import annotations

from collections.abc import Callable

from patchd.config import Config
from patchd.exceptions import ValidationError
from patchd.ingest.fields import kind_of
from patchd.ingest.records import EventParser, GroupCap, InlineInput, Label, Prediction

GROUPS_KV_KEY = "ingest:group_values"


def groups_kv_key(config: Config, model: str) -> str:
    """The ``kv`` key of a model's admitted group values (one model: the historical key)."""
    return GROUPS_KV_KEY if len(config.per_model()) == 1 else f"{GROUPS_KV_KEY}:{model}"


class ModelRouter:
    """The parser of every configured model, behind :class:`EventParser`'s interface."""

    def __init__(self, config: Config, load_groups: Callable[[str], dict[str, list[str]]]) -> None:
        self.parsers: dict[str, EventParser] = {}
        self.group_keys: dict[str, str] = {}
        for view in config.per_model():
            name = view.model.name
            key = groups_kv_key(config, name)
            self.parsers[name] = EventParser(view, GroupCap(view.groups, load_groups(key)))
            self.group_keys[name] = key
        self.names = tuple(self.parsers)
        first = self.parsers[self.names[0]]
        self._only = first if len(self.parsers) == 1 else None
        # inputs and their directory are the process's (artifacts are shared by the models)
        self.inputs = first.inputs
        self.inputs_dir = first.inputs_dir
        self.input_store = first.input_store

    def parser(self, obj: object) -> EventParser:
        """The parser of the model ``obj`` names (ValidationError when it names none of them)."""
        if self._only is not None:
            return self._only
        if type(obj) is not dict:
            raise ValidationError("wrong_type", f"an event must be an object, got {kind_of(obj)}")
        model = obj.get("model")
        found = self.parsers.get(model) if type(model) is str else None
        if found is not None:
            return found
        names = ", ".join(self.names)
        if model is None:
            raise ValidationError(
                "missing_field",
                f"is required: this serve watches several models ({names})",
                field="model",
            )
        if type(model) is not str:
            raise ValidationError(
                "wrong_type", f"must be a string, got {kind_of(model)}", field="model"
            )
        raise ValidationError(
            "unknown_model",
            f"{model[:64]!r} is not a model this serve watches ({names}); add it to `models:` "
            "or fix the event's model",
            field="model",
        )

    def planned(
        self, obj: object, source: str, now: float, planned: list[InlineInput]
    ) -> Prediction:
        return self.parser(obj).planned(obj, source, now, planned)

    def label(self, obj: object, now: float | None = None) -> Label:
        return self.parser(obj).label(obj, now)

    def groups(self) -> dict[str, GroupCap]:
        """``kv`` key -> that model's admitted group values."""
        return {self.group_keys[name]: p.groups for name, p in self.parsers.items()}
