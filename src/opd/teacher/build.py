"""Build the teacher(s) a run scores with, from [teacher] and [teachers.NAME]: local models or
servers, each behind a cache, routed by prompt source."""

from __future__ import annotations

from opd.config import Config, ConfigError, TeacherConfig
from opd.teacher.cache import CachingTeacher
from opd.teacher.local import LocalTeacher
from opd.teacher.remote import RemoteSettings, RemoteTeacher
from opd.teacher.router import TeacherRouter

SPARSE_WARNING = (
    "warning: teacher {key} is score-only (api = 'pooling'): it gives one reward per sequence and no token "
    "logprobs, so prompts routed to it get a sparse, sequence-level signal through the `hybrid` objective's "
    "reward term instead of per-token feedback"
)


def remote_settings(t: TeacherConfig) -> RemoteSettings:
    return RemoteSettings(url=t.url.rstrip("/"), api=t.api, served_model=t.served_model, topk=t.topk,
                          timeout_s=t.timeout_s, max_in_flight=t.max_in_flight, retries=t.retries,
                          backoff_s=t.backoff_s, breaker_threshold=t.breaker_threshold,
                          breaker_cooldown_s=t.breaker_cooldown_s)


def build_one(t: TeacherConfig, *, model=None, seed: int = 0):
    """One teacher: `model` (already loaded) runs locally; a config with `url` talks to a server."""
    if t.remote:
        teacher = RemoteTeacher(remote_settings(t), batch_size=t.batch_size, seed=seed)
    else:
        if model is None:
            from opd.models import load_model

            model = load_model(t.model, dtype=t.dtype, device=t.device)
        teacher = LocalTeacher(model, batch_size=t.batch_size, chunk_size=t.chunk_size, topk=t.topk,
                               fast=t.forward == "auto")
    # The cache saves network round trips; a local teacher recomputes (bit-exact resume stays bit-exact).
    return CachingTeacher(teacher, max_entries=t.cache_size) if t.cache_size and t.remote else teacher


def build_teachers(cfg: Config, source_names: list[str], *, default_model=None, default_teacher=None,
                   log=print) -> TeacherRouter:
    """`source_names` are the prompt sources' names, in the order of cfg.prompts.sources. `default_teacher`,
    when given, is the already-built local [teacher] (e.g. a cross-tokenizer one)."""
    teachers = {}
    for name, t in cfg.used_teachers().items():
        if t.api == "pooling" and t.remote:
            log(SPARSE_WARNING.format(key="[teacher]" if name == "default" else f"[teachers.{name}]"))
        if name == "default" and default_teacher is not None:
            teachers[name] = default_teacher
            continue
        teachers[name] = build_one(t, model=default_model if name == "default" else None, seed=cfg.seed)
    routes = {src: sc.teacher for src, sc in zip(source_names, cfg.prompts.sources) if sc.teacher}
    return TeacherRouter(teachers, routes, "default")


def check_tokenizers(cfg: Config, student_tokenizer) -> None:
    """Token-level feedback needs one vocabulary. A server's tokenizer is checked when `model` names a
    local folder (or builtin) with it; otherwise the server's answers are still checked token by token.
    The local [teacher] is exempt: with another tokenizer it scores through the cross-tokenizer alignment."""
    from opd.models import load_tokenizer

    for name, t in cfg.used_teachers().items():
        if name == "default" and not t.remote:
            continue
        try:
            teacher_tok = load_tokenizer(t.model)
        except ConfigError:
            if t.remote:
                continue
            raise
        if student_tokenizer.get_vocab() != teacher_tok.get_vocab():
            key = "teacher" if name == "default" else f"teachers.{name}"
            raise ConfigError(
                f"student ({cfg.student.model}) and {key} ({t.model}) use different tokenizers; token-level "
                "feedback needs one shared vocabulary. Use a teacher from the student's model family."
            )
