"""An LLM judge for the open-ended assessment (the paper's Table 3).

Each transcript saved by :mod:`dft.evaluation.chat` is scored 1-10 on four criteria: depth of
reasoning, creativity, clarity and quantitative precision, each with a one-sentence
justification. The judge is an OpenAI-compatible chat-completions endpoint (``backend:
openai``: OpenAI, vLLM, llama.cpp server, Ollama ...) or a local Hugging Face model
(``backend: local``); ``backend: none`` records every transcript as skipped.

The judge's answer must be a JSON object matching :data:`JSON_SCHEMA`; anything else is sent
back with the reason and asked again, up to ``max_retries`` times, after which the transcript
is recorded as ``{"status": "failed", "reason": ...}``: a score is never guessed. HTTP 429 and
5xx answers (and dropped connections) are retried with exponential backoff, honouring
``Retry-After``. The judge model, the prompt version and a hash of the prompt text are stored
with every judgement, so scores from different judges or prompts are never mixed unknowingly.

This module imports no torch unless the local backend is used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

from dft import DftError

log = logging.getLogger(__name__)

JUDGE_BACKENDS = ("none", "openai", "local")
#: The paper's four criteria, in its order; the JSON keys of the judge's answer.
CRITERIA = ("depth_of_reasoning", "creativity", "clarity", "quantitative_precision")
MAX_SCORE = 10

#: Defaults of ``eval.chat.judge`` (``conf/eval/chat.yaml`` sets every key).
JUDGE_DEFAULTS: dict[str, Any] = {
    "backend": "none",  #: none | openai | local
    "url": "https://api.openai.com/v1",  #: base URL (``/chat/completions`` is appended) or the full endpoint
    "model": "gpt-4o",  #: model name at the endpoint, or a local path / hub id for ``local``
    "api_key_env": "OPENAI_API_KEY",  #: environment variable holding the key; null = send none
    "max_retries": 3,  #: re-asks after an answer that is not valid JSON for the schema
    "prompt_version": "v1",  #: key of :data:`PROMPTS`
    "temperature": 0.0,
    "max_tokens": 1024,
    "json_mode": True,  #: send ``response_format: {"type": "json_object"}``
    "timeout_s": 120.0,
    "http_retries": 5,  #: retries of one request after HTTP 429/5xx or a dropped connection
    "backoff_s": 2.0,  #: first backoff; doubles each retry (Retry-After wins when sent)
}

#: JSON Schema (draft 2020-12) of the judge's answer; :func:`validate_judgement` enforces it
#: without a jsonschema dependency.
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": list(CRITERIA),
    "properties": {
        c: {
            "type": "object",
            "required": ["score", "justification"],
            "properties": {
                "score": {"type": "integer", "minimum": 1, "maximum": MAX_SCORE},
                "justification": {"type": "string", "minLength": 1},
            },
        }
        for c in CRITERIA
    },
}

_FORMAT = (
    "{"
    + ", ".join(f'"{c}": {{"score": <integer 1-10>, "justification": "<one sentence>"}}' for c in CRITERIA)
    + "}"
)

#: Versioned judge prompts. Change the wording only under a new version key: the version (and a
#: hash of the text) is stored with every score.
PROMPTS: dict[str, dict[str, str]] = {
    "v1": {
        "system": (
            "You are an impartial expert in materials science, biological materials and bio-inspired "
            "design. You evaluate answers written by AI assistants and reply only with JSON."
        ),
        "user": (
            "Below is a conversation between a human and an AI assistant. Evaluate the AI's answers "
            "(not the human's questions) on four criteria, each scored with an integer from 1 (very "
            "poor) to 10 (excellent):\n"
            "- depth_of_reasoning: do the answers explain mechanisms, causes and trade-offs, and connect "
            "structure to function across length scales, rather than list surface facts?\n"
            "- creativity: are the ideas and the proposed design original, and still physically plausible?\n"
            "- clarity: are the answers well organised and precise, and do they follow each request, "
            "including any requested format (such as JSON or a single image prompt)?\n"
            "- quantitative_precision: do the answers give specific, correct numbers with units "
            "(moduli, strengths, dimensions, fractions) instead of vague statements?\n"
            "Judge only what is written in the conversation. Empty, truncated, repetitive or off-topic "
            "answers must receive low scores.\n\n"
            "Reply with only a JSON object of this form and nothing else:\n"
            "{format}\n\n"
            "The conversation:\n\n{conversation}"
        ),
        "reask": (
            "Your reply could not be used: {reason}. Reply again with only the JSON object described "
            "above: the four keys {keys}, each with an integer score from 1 to 10 and a one-sentence "
            "justification."
        ),
    },
}


# --------------------------------------------------------------------------- configuration


def resolve_judge_config(judge_cfg: Any) -> dict:
    """``eval.chat.judge`` (DictConfig or dict, possibly partial) merged over :data:`JUDGE_DEFAULTS`."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(judge_cfg, DictConfig):
            judge_cfg = OmegaConf.to_container(judge_cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    given = judge_cfg or {}
    unknown = set(given) - set(JUDGE_DEFAULTS)
    if unknown:
        raise DftError(f"eval.chat.judge: unknown key(s) {sorted(unknown)} (known: {', '.join(JUDGE_DEFAULTS)})")
    cfg = {**copy.deepcopy(JUDGE_DEFAULTS), **given}
    if cfg["backend"] not in JUDGE_BACKENDS:
        raise DftError(f"eval.chat.judge.backend={cfg['backend']!r} is not one of {', '.join(JUDGE_BACKENDS)}")
    if cfg["prompt_version"] not in PROMPTS:
        raise DftError(f"eval.chat.judge.prompt_version={cfg['prompt_version']!r} is not one of {', '.join(PROMPTS)}")
    return cfg


def prompt_sha(version: str) -> str:
    """First 12 hex digits of the SHA-256 of prompt ``version``'s texts (stored with every score)."""
    blob = json.dumps(PROMPTS[version], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------- answer parsing


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def extract_json(text: str) -> tuple[Any, Optional[str]]:
    """Parse the JSON value in ``text``: the whole text, else a fenced block, else the outermost
    ``{...}`` span. Returns ``(value, None)`` or ``(None, reason)``."""
    t = (text or "").strip()
    if not t:
        return None, "the reply is empty"
    candidates = [t]
    m = _FENCE.search(t)
    if m:
        candidates.append(m.group(1).strip())
    i, j = t.find("{"), t.rfind("}")
    if 0 <= i < j:
        candidates.append(t[i : j + 1])
    err = None
    for c in candidates:
        try:
            return json.loads(c), None
        except json.JSONDecodeError as e:
            err = err or f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    return None, err


def validate_judgement(obj: Any) -> tuple[dict[str, int], dict[str, str]]:
    """Check a parsed answer against :data:`JSON_SCHEMA`; return ``(scores, justifications)``.

    Raises:
        ValueError: the first violation, phrased so it can be sent back to the judge.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"the reply is a JSON {type(obj).__name__}, not an object")
    missing = [c for c in CRITERIA if c not in obj]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    scores, why = {}, {}
    for c in CRITERIA:
        v = obj[c]
        if not isinstance(v, dict):
            raise ValueError(f'"{c}" must be an object with "score" and "justification"')
        s = v.get("score")
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f'"{c}.score" must be an integer, got {json.dumps(s)}')
        if not 1 <= s <= MAX_SCORE:
            raise ValueError(f'"{c}.score" must be between 1 and {MAX_SCORE}, got {s}')
        j = v.get("justification")
        if not isinstance(j, str) or not j.strip():
            raise ValueError(f'"{c}.justification" must be a non-empty string')
        scores[c], why[c] = s, j.strip()
    return scores, why


# --------------------------------------------------------------------------- transcripts


def render_conversation(transcript: dict) -> str:
    """A transcript as plain text for the judge: the system prompt, then Human/AI turns."""
    parts = []
    if transcript.get("system"):
        parts.append(f"[System prompt given to the AI]\n{transcript['system']}")
    for t in transcript["turns"]:
        parts.append(f"[Turn {t['turn']}] Human:\n{t['user']}")
        parts.append(f"[Turn {t['turn']}] AI:\n{t['assistant'] if t['assistant'] else '(empty answer)'}")
    return "\n\n".join(parts)


def _as_transcripts(transcripts: Any) -> tuple[list[dict], Optional[str]]:
    """Accept a list of transcripts, ``run_chat``'s result or a loaded ``chat.json``."""
    if isinstance(transcripts, dict):
        artefact = transcripts.get("artefact")
        for key in ("transcripts", "scenarios"):
            if key in transcripts:
                return list(transcripts[key]), artefact
        raise DftError("judge_transcripts: expected a list of transcripts, run_chat's result or chat.json")
    return list(transcripts), None


# --------------------------------------------------------------------------- backends


class JudgeUnavailable(Exception):
    """The judge could not be asked at all (HTTP error after retries, bad response, missing key)."""


def _endpoint(url: str) -> str:
    u = url.rstrip("/")
    return u if u.endswith("/chat/completions") else u + "/chat/completions"


def post_json(url: str, payload: dict, headers: dict, *, timeout: float, retries: int, backoff_s: float) -> dict:
    """POST ``payload`` as JSON; retry 429, 5xx and dropped connections with exponential backoff.

    Raises:
        JudgeUnavailable: another HTTP error, retries exhausted, or a body that is not JSON.
    """
    body = json.dumps(payload).encode()
    last = ""
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
        delay = backoff_s * (2**attempt)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read().decode("utf-8", "replace")
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise JudgeUnavailable(f"the endpoint answered with a body that is not JSON: {raw[:200]!r}") from None
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")[:300]
            last = f"HTTP {e.code} from {url}: {text}"
            if e.code != 429 and not 500 <= e.code < 600:
                raise JudgeUnavailable(last) from None
            retry_after = e.headers.get("Retry-After") if e.headers else None
            if retry_after:
                try:
                    delay = min(float(retry_after), 60.0)
                except ValueError:
                    pass
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last = f"cannot reach {url}: {getattr(e, 'reason', e)}"
        if attempt < retries:
            log.warning("judge: %s; retry %d/%d in %.1f s", last, attempt + 1, retries, delay)
            time.sleep(delay)
    raise JudgeUnavailable(f"{last} (after {retries + 1} tries)")


class OpenAIJudge:
    """An OpenAI-compatible ``/chat/completions`` endpoint; the key comes from the environment."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.url = _endpoint(cfg["url"])
        self.headers = {}
        env = cfg["api_key_env"]
        if env:
            key = os.environ.get(env)
            if not key:
                raise JudgeUnavailable(f"the API key environment variable {env} is not set")
            self.headers["Authorization"] = f"Bearer {key}"

    def chat(self, messages: list[dict]) -> str:
        payload: dict[str, Any] = {
            "model": self.cfg["model"],
            "messages": messages,
            "temperature": self.cfg["temperature"],
            "max_tokens": self.cfg["max_tokens"],
        }
        if self.cfg["json_mode"]:
            payload["response_format"] = {"type": "json_object"}
        data = post_json(
            self.url, payload, self.headers,
            timeout=float(self.cfg["timeout_s"]), retries=int(self.cfg["http_retries"]), backoff_s=float(self.cfg["backoff_s"]),
        )
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeUnavailable(f"the endpoint's answer has no choices[0].message.content: {json.dumps(data)[:200]}") from None
        return content or ""


_LOCAL_CACHE: dict[str, tuple[Any, Any]] = {}


class LocalJudge:
    """A local Hugging Face chat model (path or hub id in ``model``), greedy decoding."""

    def __init__(self, cfg: dict):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from dft.modeling import resolve_device, resolve_dtype

        self.cfg = cfg
        name = str(Path(cfg["model"]).expanduser()) if Path(cfg["model"]).expanduser().exists() else cfg["model"]
        if name not in _LOCAL_CACHE:
            _LOCAL_CACHE.clear()  # keep at most one judge model in memory
            device = resolve_device("auto")
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=resolve_dtype("auto", device)).to(device).eval()
            _LOCAL_CACHE[name] = (model, tok)
        self.model, self.tok = _LOCAL_CACHE[name]

    def chat(self, messages: list[dict]) -> str:
        import torch

        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tok(text, add_special_tokens=False, return_tensors="pt").to(self.model.device)
        eos = [i for i in {self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>"),
                           self.tok.convert_tokens_to_ids("<|eot_id|>")} if i is not None and i != self.tok.unk_token_id]
        with torch.inference_mode():
            out = self.model.generate(**enc, do_sample=False, max_new_tokens=int(self.cfg["max_tokens"]),
                                      eos_token_id=eos, pad_token_id=eos[0] if self.tok.pad_token_id is None else self.tok.pad_token_id)
        return self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _make_judge(cfg: dict):
    return OpenAIJudge(cfg) if cfg["backend"] == "openai" else LocalJudge(cfg)


# --------------------------------------------------------------------------- judging


def judge_one(judge, transcript: dict, cfg: dict) -> dict:
    """Ask ``judge`` about one transcript; re-ask on an invalid answer; never invent a score."""
    prompt = PROMPTS[cfg["prompt_version"]]
    messages = [
        {"role": "system", "content": prompt["system"]},
        {"role": "user", "content": prompt["user"].format(format=_FORMAT, conversation=render_conversation(transcript))},
    ]
    base = {
        "scenario": transcript.get("scenario"),
        "judge_backend": cfg["backend"],
        "judge_model": cfg["model"],
        "prompt_version": cfg["prompt_version"],
        "prompt_sha": prompt_sha(cfg["prompt_version"]),
    }
    answers: list[str] = []
    reason = ""
    for attempt in range(int(cfg["max_retries"]) + 1):
        try:
            answer = judge.chat(messages)
        except JudgeUnavailable as e:
            return {**base, "status": "failed", "reason": str(e), "attempts": attempt + 1, "answers": answers}
        answers.append(answer[:2000])
        obj, err = extract_json(answer)
        try:
            if err:
                raise ValueError(err)
            scores, why = validate_judgement(obj)
        except ValueError as e:
            reason = str(e)
            log.info("judge: invalid answer for %s (%s)%s", base["scenario"], reason,
                     "; asking again" if attempt < int(cfg["max_retries"]) else "")
            messages = messages + [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": prompt["reask"].format(reason=reason, keys=", ".join(CRITERIA))},
            ]
            continue
        return {**base, "status": "ok", "scores": scores, "justifications": why, "total": sum(scores.values()),
                "attempts": attempt + 1, "answer": answer[:2000]}
    return {**base, "status": "failed",
            "reason": f"no valid JSON answer after {int(cfg['max_retries']) + 1} attempts; last: {reason}",
            "attempts": int(cfg["max_retries"]) + 1, "answers": answers}


def judge_transcripts(transcripts: Any, judge_cfg: Any, *, out_dir: Optional[Path] = None,
                      artefact: Optional[str] = None) -> list[dict]:
    """Score every transcript; with ``out_dir``, also write ``out_dir/judge.json``.

    Args:
        transcripts: a list of transcripts (``chat.json["scenarios"]``), ``run_chat``'s result or
            a loaded ``chat.json`` (whose ``artefact`` is then used).
        judge_cfg: ``eval.chat.judge``.

    Returns:
        One judgement per transcript, in order: ``status`` ``ok`` (``scores``, ``justifications``,
        ``total``), ``failed`` (``reason``) or ``skipped`` (backend ``none``), each with
        ``scenario``, ``judge_backend``, ``judge_model``, ``prompt_version``, ``prompt_sha``.
    """
    cfg = resolve_judge_config(judge_cfg)
    items, from_doc = _as_transcripts(transcripts)
    artefact = artefact or from_doc
    base = {"judge_backend": cfg["backend"], "judge_model": cfg["model"], "prompt_version": cfg["prompt_version"],
            "prompt_sha": prompt_sha(cfg["prompt_version"])}
    if cfg["backend"] == "none":
        log.warning("judge: eval.chat.judge.backend=none: the transcripts are saved but not scored")
        out = [{"scenario": t.get("scenario"), **base, "status": "skipped", "reason": "eval.chat.judge.backend=none"} for t in items]
    else:
        try:
            judge = _make_judge(cfg)
        except JudgeUnavailable as e:  # e.g. the key is missing: every transcript fails, none is scored
            log.error("judge: %s", e)
            judge = None
            out = [{"scenario": t.get("scenario"), **base, "status": "failed", "reason": str(e), "attempts": 0} for t in items]
        if judge is not None:
            out = []
            for t in items:
                j = judge_one(judge, t, cfg)
                log.info("judge %s/%s: %s", artefact, j["scenario"],
                         f"{j['total']}/{len(CRITERIA) * MAX_SCORE}" if j["status"] == "ok" else f"failed ({j['reason']})")
                out.append(j)
    if out_dir is not None:
        write_judge_json(Path(out_dir), out, cfg, artefact)
    return out


def write_judge_json(out_dir: Path, judgements: list[dict], cfg: dict, artefact: Optional[str]) -> Path:
    """Write ``out_dir/judge.json`` atomically (the API key is never part of it)."""
    summary = score_table({artefact or "": judgements})[0]
    summary.pop("artefact"), summary.pop("normalised")
    doc = {
        "artefact": artefact,
        "judge": {k: cfg[k] for k in ("backend", "url", "model", "prompt_version", "temperature", "max_tokens",
                                       "max_retries", "json_mode")} | {"prompt_sha": prompt_sha(cfg["prompt_version"])},
        "criteria": list(CRITERIA),
        "max_score": MAX_SCORE,
        "judgements": judgements,
        "summary": summary,
    }
    path = out_dir / "judge.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".judge.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- table


def score_table(judgements_by_artefact: dict[str, Any], *, scenario: Optional[str] = None) -> list[dict]:
    """The paper's Table 3: one row per artefact, in the order given.

    Each criterion is the mean over the artefact's ``ok`` judgements (of ``scenario`` only, when
    given); ``total`` is their sum (out of 40), ``normalised`` = total / the best artefact's
    total. An artefact without a valid judgement gets ``None`` scores (never a guessed one).
    Values may be judgement lists or loaded ``judge.json`` documents.

    Returns:
        ``[{"artefact", "n_scored", "n_failed", "n_skipped", <criterion>..., "total", "max_total",
        "normalised", "judge_model", "prompt_version"}]``
    """
    rows, totals = [], {}
    for artefact, js in judgements_by_artefact.items():
        if isinstance(js, dict):
            js = js["judgements"]
        if scenario is not None:
            js = [j for j in js if j.get("scenario") == scenario]
        ok = [j for j in js if j.get("status") == "ok"]
        row: dict[str, Any] = {
            "artefact": artefact,
            "n_scored": len(ok),
            "n_failed": sum(j.get("status") == "failed" for j in js),
            "n_skipped": sum(j.get("status") == "skipped" for j in js),
        }
        if ok:
            means = {c: Fraction(sum(j["scores"][c] for j in ok), len(ok)) for c in CRITERIA}
            totals[artefact] = sum(means.values())
            row.update({c: float(m) for c, m in means.items()})
            row["total"] = float(totals[artefact])
        else:
            row.update({c: None for c in CRITERIA})
            row["total"] = None
        row["max_total"] = len(CRITERIA) * MAX_SCORE
        row["judge_model"] = ",".join(sorted({str(j.get("judge_model")) for j in js})) or None
        row["prompt_version"] = ",".join(sorted({str(j.get("prompt_version")) for j in js})) or None
        rows.append(row)
    best = max(totals.values(), default=None)
    for row in rows:
        t = totals.get(row["artefact"])
        row["normalised"] = float(t / best) if t is not None and best else None
    mixed = {(r["judge_model"], r["prompt_version"]) for r in rows if r["n_scored"]}
    if len(mixed) > 1:
        log.warning("score_table: artefacts were scored by different judges or prompts %s; totals are not comparable", sorted(mixed))
    return rows
