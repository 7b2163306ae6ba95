"""What every task is: documents, a prompt per document, a label, per-document scores, an aggregate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mft.errors import MftError
from mft.eval import data


@dataclass
class Task:
    """One olmes task. Subclasses set the class attributes and implement the four `doc` methods."""

    name: str
    num_shots: int | None = None
    limit: int | None = None
    dataset_path: str | None = None
    data_dir: str | None = None
    fewshot_source: str | None = None
    max_gen_toks: int | None = None
    source: data.Source | None = field(default=None, init=False)
    data_source: dict | None = field(default=None, init=False)  # `Source.record()` once the docs are read

    # Set by subclasses (class attributes, not constructor arguments).
    default_shots: ClassVar[int] = 0
    default_max_gen_toks: ClassVar[int] = 512
    default_fewshot: ClassVar[str | None] = None
    stops: ClassVar[tuple[str, ...]] = ()
    primary_metric: ClassVar[str] = "exact_match"
    hub: ClassVar[data.Source | None] = None
    data_dir_files: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        self.num_shots = self.default_shots if self.num_shots is None else self.num_shots
        self.max_gen_toks = self.default_max_gen_toks if self.max_gen_toks is None else self.max_gen_toks
        if isinstance(self.max_gen_toks, bool) or not isinstance(self.max_gen_toks, int) or self.max_gen_toks < 1:
            raise MftError(f"{self.name}: max_gen_toks must be a positive integer, got {self.max_gen_toks!r}")
        self.fewshot_source = self.fewshot_source or self.default_fewshot
        available = len(data.load_fewshot(self.fewshot_source)) if self.fewshot_source else 0
        if not 0 <= self.num_shots <= available:
            raise MftError(f"{self.name}: num_shots {self.num_shots} > the {available} exemplars in "
                           f"{self.fewshot_source or 'this 0-shot task'}; use at most {available}")

    # -- documents ---------------------------------------------------------------------------------
    def load_docs(self) -> list[dict]:
        """Documents in dataset order (after `select`), each with `doc_id` and `native_id`, cut to `limit`."""
        self.source = data.resolve_local(self.dataset_path, self.data_dir, self.data_dir_files)
        if self.source is None:
            if self.dataset_path:  # a hub id in place of the default
                self.source = data.Source(self.dataset_path, self.hub.config, self.hub.split)
            else:
                self.source = self.hub
        read = self.read(self.source)
        rows = self.select(read)
        self.data_source = self.source.record(read)
        if not rows:
            raise MftError(f"{self.name}: no documents in {self.source.describe()}")
        docs = [self.prepare(row, index) for index, row in enumerate(rows)]
        return docs[: self.limit] if self.limit else docs

    def read(self, source: data.Source) -> list[dict]:
        return data.load_source(source)

    def select(self, rows: list[dict]) -> list[dict]:
        return rows

    def prepare(self, row: dict, index: int) -> dict:
        return {"doc_id": index, "native_id": index, **row}

    # -- prompting ---------------------------------------------------------------------------------
    def exemplars(self) -> list[dict]:
        if not self.num_shots:
            return []
        return data.load_fewshot(self.fewshot_source)[: self.num_shots]

    def prompt(self, doc: dict) -> str:
        raise NotImplementedError

    def label(self, doc: dict):
        raise NotImplementedError

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, docs: list[dict], outputs: list[str], workers: int | None = None) -> list[dict]:
        """Per document: {"metrics": {...}, "model_answer": ...}."""
        raise NotImplementedError

    def aggregate(self, per_doc: list[dict]) -> dict[str, float]:
        """Means over documents of each metric; `primary_score` is the primary metric's."""
        names = list(per_doc[0]) if per_doc else [self.primary_metric]
        scores = {name: sum(float(m[name]) for m in per_doc) / max(1, len(per_doc)) for name in names}
        return {**scores, "primary_score": scores[self.primary_metric]}

    def config(self) -> dict:
        """The `task_config` recorded with the results."""
        return {
            "task_name": self.name, "num_shots": self.num_shots, "limit": self.limit,
            "primary_metric": self.primary_metric, "fewshot_source": self.fewshot_source if self.num_shots else None,
            # the spec's own key and value (None: the task's default data), so it can be given back as a --task
            # spec; which file or hub revision was read is `data_source`
            "dataset_path": self.dataset_path, "data_source": self.data_source,
            "generation_kwargs": {"max_gen_toks": self.max_gen_toks, "temperature": 0.0, "do_sample": False,
                                  "stop_sequences": list(self.stops)},
        }


def joined_prompt(examples: list[str], query: str) -> str:
    """Exemplars joined by a blank line, a blank line, then the query (just the query at 0 shots)."""
    return "\n\n".join([*examples, query])
