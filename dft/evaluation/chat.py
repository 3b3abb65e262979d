"""Open-ended assessment: multi-turn conversations and an image-prompt design task.

The paper (Lu, Luu & Buehler, arXiv 2409.03444) compares its models in open-ended
conversations: questions about collagen and leaves, designing a new material from them,
summarising the design as JSON, and writing a text-to-image prompt for a material combining
spider silk, collagen and leaf microstructure. This module plays those scenarios against one
artefact and saves the transcripts; :mod:`dft.evaluation.judge` scores them.

Configuration (``eval=[quick,chat]`` → ``cfg.eval.chat``; see ``conf/eval/chat.yaml``)::

    scenarios: [collagen_leaves, image_prompt]   # names of conf/chat/<name>.yaml, or inline dicts
    scenario_dir: null                            # null = <repo>/conf/chat
    sampling: {temperature, top_k, top_p, repetition_penalty, max_new_tokens}
    seed: 42                                      # reset before every scenario
    judge: {...}                                  # dft.evaluation.judge
    image: {pipeline: null | /local/diffusers/folder, ...}

A scenario (``conf/chat/<name>.yaml`` or inline)::

    name: collagen_leaves
    kind: chat | image_prompt
    system: "You are ..."          # or null
    turns:
      - "a user turn"
      - {content: "a user turn", expect: json}          # the answer should be a JSON object
      - {content: "a user turn", expect: image_prompt}  # the answer is a text-to-image prompt

Every scenario starts from the same seed (``torch.manual_seed`` + ``transformers.set_seed``),
so the transcripts depend only on the model, the scenario and the sampling settings, not on
the order the scenarios run in. ``chat.json`` holds nothing that varies between runs (no
timings), so two runs with the same seed on the same hardware write identical files.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from dft import ROOT, DftError
from dft.evaluation.judge import JUDGE_DEFAULTS, extract_json, resolve_judge_config

log = logging.getLogger(__name__)

#: Every key ``eval.chat`` may hold and its default; ``conf/eval/chat.yaml`` sets each of them
#: (a test keeps the two in step). Unknown keys are rejected: ``EvalConfig.chat`` is an
#: untyped dict, so this module is its schema.
DEFAULTS: dict[str, Any] = {
    "scenarios": ["collagen_leaves", "image_prompt"],
    "scenario_dir": None,
    # The paper's sampling settings (it reports temperature 0.1-0.2).
    "sampling": {
        "temperature": 0.1,
        "top_k": 512,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "max_new_tokens": 1024,
    },
    "seed": 42,
    "judge": copy.deepcopy(JUDGE_DEFAULTS),  # dft.evaluation.judge
    "image": {
        "pipeline": None,
        "n_images": 1,
        "num_inference_steps": 30,
        "guidance_scale": 7.5,
        "height": None,
        "width": None,
        "dtype": "auto",
    },
}

SCENARIO_KINDS = ("chat", "image_prompt")
TURN_EXPECT = (None, "json", "image_prompt")
_SCENARIO_KEYS = {"name", "kind", "description", "system", "turns"}

_NOTICED: set[str] = set()


def _notice_once(msg: str) -> None:
    if msg not in _NOTICED:
        _NOTICED.add(msg)
        log.warning(msg)


# --------------------------------------------------------------------------- configuration


def _plain(obj: Any) -> Any:
    """DictConfig/ListConfig -> plain containers (resolved); anything else unchanged."""
    from dft.config import plain

    return plain(obj)


def _merge(defaults: dict, given: dict, where: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise DftError(f"{where}.{key} is not a known key (known: {', '.join(defaults)})")
        if isinstance(defaults[key], dict):
            if value is None:  # `judge: null` keeps the defaults
                continue
            if not isinstance(value, dict):
                raise DftError(f"{where}.{key} must be a mapping, got {type(value).__name__}")
            out[key] = _merge(defaults[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def resolve_chat_config(chat_cfg: Any) -> dict:
    """``eval.chat`` (DictConfig or dict, possibly partial) merged over :data:`DEFAULTS`.

    Raises:
        DftError: an unknown key, with its full path (``eval.chat.sampling.temprature``).
    """
    given = _plain(chat_cfg) or {}
    if not isinstance(given, dict):
        raise DftError(f"eval.chat must be a mapping, got {type(given).__name__}")
    return _merge(DEFAULTS, given, "eval.chat")


def _scenario_dir(cfg: dict) -> Path:
    return Path(cfg["scenario_dir"]).expanduser() if cfg["scenario_dir"] else ROOT / "conf" / "chat"


def _validate_scenario(sc: Any, where: str) -> dict:
    if not isinstance(sc, dict):
        raise DftError(f"{where}: a scenario must be a mapping with name, system and turns")
    unknown = set(sc) - _SCENARIO_KEYS
    if unknown:
        raise DftError(f"{where}: unknown key(s) {sorted(unknown)} (known: {sorted(_SCENARIO_KEYS)})")
    if not isinstance(sc.get("name"), str) or not sc["name"]:
        raise DftError(f"{where}: 'name' must be a non-empty string")
    kind = sc.get("kind", "chat")
    if kind not in SCENARIO_KINDS:
        raise DftError(f"{where}: kind={kind!r} is not one of {', '.join(SCENARIO_KINDS)}")
    system = sc.get("system")
    if system is not None and not isinstance(system, str):
        raise DftError(f"{where}: 'system' must be a string or null")
    turns = sc.get("turns")
    if not isinstance(turns, list) or not turns:
        raise DftError(f"{where}: 'turns' must be a non-empty list of user turns")
    norm = []
    for i, t in enumerate(turns):
        if isinstance(t, str):
            t = {"content": t, "expect": None}
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or set(t) - {"content", "expect"}:
            raise DftError(f"{where}: turns[{i}] must be a string or {{content: str, expect: json|image_prompt|null}}")
        if t.get("expect") not in TURN_EXPECT:
            raise DftError(f"{where}: turns[{i}].expect={t.get('expect')!r} is not one of json, image_prompt, null")
        norm.append({"content": t["content"].strip(), "expect": t.get("expect")})
    if kind == "image_prompt" and not any(t["expect"] == "image_prompt" for t in norm):
        raise DftError(f"{where}: an image_prompt scenario needs a turn with expect: image_prompt")
    return {
        "name": sc["name"],
        "kind": kind,
        "description": sc.get("description"),
        "system": system.strip() if isinstance(system, str) else None,
        "turns": norm,
    }


def load_scenarios(cfg: dict) -> list[dict]:
    """The scenarios of a resolved chat config: names are read from ``<scenario_dir>/<name>.yaml``.

    Raises:
        DftError: a missing file (listing the ones there), a malformed scenario, duplicate names.
    """
    import yaml

    out, seen = [], set()
    folder = _scenario_dir(cfg)
    for i, entry in enumerate(cfg["scenarios"] or []):
        if isinstance(entry, str):
            path = folder / f"{entry}.yaml"
            if not path.exists():
                have = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
                raise DftError(f"eval.chat.scenarios[{i}]={entry!r}: no file {path} (available: {', '.join(have) or 'none'})")
            sc = _validate_scenario(yaml.safe_load(path.read_text()), str(path))
            if sc["name"] != entry:
                raise DftError(f"{path}: name={sc['name']!r} must match the file name {entry!r}")
        else:
            sc = _validate_scenario(_plain(entry), f"eval.chat.scenarios[{i}]")
        if sc["name"] in seen:
            raise DftError(f"eval.chat.scenarios: duplicate scenario name {sc['name']!r}")
        seen.add(sc["name"])
        out.append(sc)
    if not out:
        raise DftError("eval.chat.scenarios is empty: name at least one file of conf/chat/")
    return out


def validate_chat_config(chat_cfg: Any) -> dict:
    """Check ``eval.chat`` before anything trains; return the resolved config.

    Checks the keys, every scenario file, the judge backend (and, for ``openai``, that the API
    key's environment variable is set) and the image pipeline folder. Meant for the dry run.

    Raises:
        DftError: one line naming the key.
    """
    cfg = resolve_chat_config(chat_cfg)
    load_scenarios(cfg)
    s = cfg["sampling"]
    if s["max_new_tokens"] is None or int(s["max_new_tokens"]) < 1:
        raise DftError("eval.chat.sampling.max_new_tokens must be >= 1")
    if float(s["temperature"]) < 0:
        raise DftError("eval.chat.sampling.temperature must be >= 0 (0 = greedy)")
    j = resolve_judge_config(cfg["judge"])
    if j["backend"] == "openai" and j["api_key_env"] and not os.environ.get(j["api_key_env"]):
        raise DftError(
            f"eval.chat.judge.backend=openai needs an API key in the environment variable {j['api_key_env']} "
            "(or set eval.chat.judge.api_key_env=null for a server that needs none)"
        )
    if j["backend"] in ("openai", "local") and not j["model"]:
        raise DftError(f"eval.chat.judge.model must name the judge model for backend={j['backend']}")
    pipe = cfg["image"]["pipeline"]
    if pipe is not None and not (Path(pipe).expanduser() / "model_index.json").exists():
        raise DftError(f"eval.chat.image.pipeline={pipe}: no diffusers pipeline there (expected model_index.json)")
    return cfg


# --------------------------------------------------------------------------- generation


def _generation_config(sampling: dict, eos_ids: list[int], pad_id: Optional[int], max_new_tokens: int):
    from transformers import GenerationConfig

    temperature = float(sampling["temperature"])
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "repetition_penalty": float(sampling["repetition_penalty"]),
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_k=int(sampling["top_k"]), top_p=float(sampling["top_p"]))
    else:  # temperature 0 means greedy decoding
        kwargs.update(do_sample=False)
    return GenerationConfig(**kwargs)


def _reply(model, tokenizer, model_cfg, messages: list[dict], sampling: dict, eos_ids: list[int]) -> dict:
    """One assistant turn for ``messages`` (the conversation so far, ending with a user turn)."""
    import torch

    from dft.families import apply_system_policy

    rendered = apply_system_policy(messages, model_cfg)
    text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    # The template already writes any BOS it wants; the tokenizer must not add a second one.
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    n_prompt = int(enc["input_ids"].shape[1])
    max_new = int(sampling["max_new_tokens"])
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and n_prompt + max_new > limit:
        max_new = limit - n_prompt
        if max_new < 1:
            return {"assistant": "", "n_prompt_tokens": n_prompt, "n_new_tokens": 0, "finish": "context_full"}
        log.warning("chat: prompt of %d tokens leaves only %d new tokens in the %d-token context", n_prompt, max_new, limit)
    gen_cfg = _generation_config(sampling, eos_ids, tokenizer.pad_token_id, max_new)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            generation_config=gen_cfg,
        )
    new = out[0, n_prompt:].tolist()
    finish = "eos" if new and new[-1] in eos_ids else "length"
    # Drop the end token itself (and any padding after it) but keep the text verbatim otherwise.
    while new and (new[-1] in eos_ids or new[-1] == tokenizer.pad_token_id):
        new.pop()
    answer = tokenizer.decode(new, skip_special_tokens=True).strip()
    return {"assistant": answer, "n_prompt_tokens": n_prompt, "n_new_tokens": len(out[0]) - n_prompt, "finish": finish}


def clean_image_prompt(text: str) -> str:
    """The prompt a text-to-image model gets from an answer: code fences, a ``Prompt:`` label and
    surrounding quotes removed; the wording itself untouched."""
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        t = t.rsplit("```", 1)[0]
    t = t.strip()
    if t.lower().startswith("prompt:"):
        t = t[len("prompt:"):].strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        t = t[1:-1].strip()
    return t


def run_scenario(model, tokenizer, model_cfg, scenario: dict, sampling: dict, seed: int) -> dict:
    """Play one scenario turn by turn from a fresh seed; return its transcript (see CONTRACTS)."""
    import torch
    import transformers

    from dft.modeling import generation_eos_ids

    torch.manual_seed(seed)
    transformers.set_seed(seed)
    eos_ids = generation_eos_ids(tokenizer, model_cfg)
    messages: list[dict] = []
    if scenario["system"]:
        messages.append({"role": "system", "content": scenario["system"]})
    turns, image_prompt = [], None
    for i, turn in enumerate(scenario["turns"], start=1):
        messages.append({"role": "user", "content": turn["content"]})
        r = _reply(model, tokenizer, model_cfg, messages, sampling, eos_ids)
        messages.append({"role": "assistant", "content": r["assistant"]})
        row = {"turn": i, "user": turn["content"], **r, "expect": turn["expect"]}
        if turn["expect"] == "json":
            obj, err = extract_json(r["assistant"])
            row.update(json_valid=isinstance(obj, dict), json=obj if isinstance(obj, dict) else None,
                       json_error=None if isinstance(obj, dict) else (err or "not a JSON object"))
        if turn["expect"] == "image_prompt":
            image_prompt = clean_image_prompt(r["assistant"])
        turns.append(row)
        if r["finish"] == "context_full":
            log.warning("chat: scenario %s stopped at turn %d: the context is full", scenario["name"], i)
            break
    return {
        "scenario": scenario["name"],
        "kind": scenario["kind"],
        "system": scenario["system"],
        "seed": seed,
        "turns": turns,
        "image_prompt": image_prompt,
        "images": [],
        "image_notice": None,
    }


# --------------------------------------------------------------------------- images


def _render_images(transcripts: list[dict], image_cfg: dict, seed: int, out_dir: Path, device: str) -> None:
    """Render every image prompt with a local diffusers pipeline, or record why not (once)."""
    wanted = [t for t in transcripts if t["image_prompt"]]
    if not wanted:
        return
    pipe_path = image_cfg["pipeline"]
    notice = None
    if pipe_path is None:
        notice = "image rendering skipped: eval.chat.image.pipeline is null (the image prompts are saved in chat.json)"
    elif not (Path(pipe_path).expanduser() / "model_index.json").exists():
        notice = f"image rendering skipped: eval.chat.image.pipeline={pipe_path} is not a local diffusers pipeline (no model_index.json)"
    else:
        try:
            import diffusers  # noqa: F401 - lazy: only runs that render images need it
        except ImportError:
            notice = "image rendering skipped: diffusers is not installed (pip install diffusers)"
    if notice:
        _notice_once(notice)
        for t in wanted:
            t["image_notice"] = notice
        return

    import torch
    from diffusers import DiffusionPipeline

    from dft.modeling import resolve_dtype

    dtype = resolve_dtype(image_cfg["dtype"], device)
    pipe = DiffusionPipeline.from_pretrained(str(Path(pipe_path).expanduser()), torch_dtype=dtype).to(device)
    extra = {k: image_cfg[k] for k in ("num_inference_steps", "guidance_scale", "height", "width") if image_cfg[k] is not None}
    try:
        for t in wanted:
            folder = out_dir / "chat_images" / t["scenario"]
            folder.mkdir(parents=True, exist_ok=True)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            images = pipe(prompt=t["image_prompt"], num_images_per_prompt=int(image_cfg["n_images"]), generator=gen, **extra).images
            for k, img in enumerate(images):
                p = folder / f"{k}.png"
                img.save(p)
                t["images"].append(str(p.relative_to(out_dir)))
    finally:
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- entry point


def _atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run_chat(model, tokenizer, model_cfg, chat_cfg, out_dir: Path, artefact: str) -> dict:
    """Play every scenario of ``chat_cfg`` against ``model`` and save ``out_dir/chat.json``.

    Each user turn is answered with the whole conversation so far, rendered through the
    tokenizer's chat template after :func:`dft.families.apply_system_policy`; generation stops
    on :func:`dft.modeling.generation_eos_ids`. Image-prompt scenarios save the prompt and,
    when ``image.pipeline`` is a local diffusers folder, the rendered images
    (``out_dir/chat_images/<scenario>/<k>.png``).

    Returns:
        ``{"columns": [artefact, scenario, turn, user, assistant], "data": [[...], ...],
        "transcripts": [...], "path": ".../chat.json", "seconds": x}``: ``columns``/``data``
        go straight into ``wandb.Table(columns=..., data=...)``; ``transcripts`` into
        :func:`dft.evaluation.judge.judge_transcripts`.
    """
    import torch
    import transformers

    from dft.modeling import generation_eos_ids

    cfg = resolve_chat_config(chat_cfg)
    scenarios = load_scenarios(cfg)
    sampling, seed = cfg["sampling"], int(cfg["seed"])
    out_dir = Path(out_dir)
    was_training = model.training
    model.eval()
    t_all = time.time()
    transcripts = []
    try:
        for sc in scenarios:
            t0 = time.time()
            tr = run_scenario(model, tokenizer, model_cfg, sc, sampling, seed)
            n_new = sum(t["n_new_tokens"] for t in tr["turns"])
            dt = time.time() - t0
            log.info("chat %s/%s: %d turns, %d new tokens in %.1f s (%.1f tok/s)",
                     artefact, sc["name"], len(tr["turns"]), n_new, dt, n_new / max(dt, 1e-9))
            transcripts.append(tr)
    finally:
        if was_training:
            model.train()
    device = next(model.parameters()).device.type
    _render_images(transcripts, cfg["image"], seed, out_dir, device)
    doc = {
        "artefact": artefact,
        "model": getattr(model_cfg, "name", None),
        "seed": seed,
        "sampling": sampling,
        "eos_token_ids": generation_eos_ids(tokenizer, model_cfg),
        "system_policy": getattr(model_cfg, "system_policy", "native"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "device": device,
        "scenarios": transcripts,
    }
    path = out_dir / "chat.json"
    _atomic_write_json(path, doc)
    data = [[artefact, tr["scenario"], t["turn"], t["user"], t["assistant"]] for tr in transcripts for t in tr["turns"]]
    return {
        "columns": ["artefact", "scenario", "turn", "user", "assistant"],
        "data": data,
        "transcripts": transcripts,
        "artefact": artefact,
        "path": str(path),
        "seconds": round(time.time() - t_all, 2),
    }
