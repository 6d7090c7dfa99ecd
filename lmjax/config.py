"""Every config field with its default, validation with clear errors, derived values.

A config file in ``configs/`` starts from :func:`default_config` and changes a few fields.
:func:`validate` runs before anything is compiled and raises :class:`ConfigError` naming the
offending key. :func:`override` sets one dotted key, checked (command lines, sweeps,
conversions, plans). Reading config files and command lines is :mod:`lmjax.config_file`.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import re
from typing import Any

import ml_collections

from lmjax import config_relations as relations

MESH_AXES = ("data", "stage", "fsdp", "expert", "context", "tensor")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITION_EMBEDDINGS = ("rope", "learned", "none")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
ATTENTION_BACKENDS = ("xla", "blockwise", "cudnn", "splash")
CONTEXT_ATTENTION = ("ring", "allgather")
QUANTIZATIONS = ("none", "fp8")
ROUTERS = ("softmax", "sigmoid")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
DTYPES = ("float32", "bfloat16")  # float16 is refused: without loss scaling its gradients underflow
DATA_FORMATS = ("text", "prompt_response", "chat", "preference")
TXT_SPLITS = ("file", "blank_line")  # this and the next two: imported by lmjax.data
BAD_RECORD_POLICIES = ("skip", "fail")
LONG_DOCUMENT_POLICIES = ("split", "truncate", "skip", "fail")
NAN_POLICIES = ("halt", "skip")
OPTIMIZERS = ("adamw", "adafactor", "lion", "muon")
SCHEDULES = ("cosine", "wsd", "constant", "linear")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
OBJECTIVES = ("causal", "masked", "dpo")
LORA_TARGETS = relations.LORA_TARGETS

# What validate checks field by field; relations between fields are checked after these.
CHOICES = {  # key -> allowed values
    "model.param_dtype": DTYPES,
    "model.compute_dtype": DTYPES,
    "model.norm": NORMS,
    "model.mlp": MLPS,
    "model.position_embedding": POSITION_EMBEDDINGS,
    "model.rope_scaling": ROPE_SCALINGS,
    "model.remat": REMAT_POLICIES,
    "model.attention": ATTENTION_BACKENDS,
    "model.context_attention": CONTEXT_ATTENTION,
    "model.quantization": QUANTIZATIONS,
    "model.router": ROUTERS,
    "model.pipeline_schedule": PIPELINE_SCHEDULES,
    "data.format": DATA_FORMATS,
    "data.txt_split": TXT_SPLITS,
    "data.bad_records": BAD_RECORD_POLICIES,
    "data.long_documents": LONG_DOCUMENT_POLICIES,
    "train.nan_policy": NAN_POLICIES,
    "optim.name": OPTIMIZERS,
    "optim.schedule": SCHEDULES,
    "optim.decay_shape": DECAY_SHAPES,
    "train.objective": OBJECTIVES,
}
CHOICE_HINTS = {"float16": " float16 needs loss scaling, which lmjax lacks (small gradients underflow): use bfloat16."}
POSITIVE = (
    "model.vocab_size", "model.num_layers", "model.embed_dim", "model.num_heads",
    "model.num_kv_heads", "model.head_dim", "model.mlp_dim", "model.max_seq_len",
    "model.pipeline_repeats", "data.seq_len", "data.global_batch_size", "optim.learning_rate",
    "optim.grad_accum_steps", "train.steps", "train.log_every", "train.eval_batches",
    "train.keep_checkpoints", "train.spike_threshold", "train.spike_max_consecutive",
    "optim.muon_ns_steps", "model.router_scale", "model.lora_alpha", "train.dpo_beta",
    "train.distill_temperature",
)
AT_LEAST = {  # key -> smallest allowed value
    "model.sliding_window": 0, "model.loss_chunk": 0, "model.lora_rank": 0, "model.num_experts": 0, "model.moe_every": 1,
    "model.experts_per_token": 1, "model.expert_mlp_dim": 0, "model.num_shared_experts": 0,
    "model.first_dense_layers": 0, "model.capacity_factor": 0, "model.moe_aux_loss": 0,
    "model.moe_z_loss": 0, "model.router_bias_rate": 0, "model.rope_attention_factor": 0,
    "model.rope_mscale": 0, "model.rope_mscale_all_dim": 0, "train.z_loss": 0, "data.worker_count": 0,
    "data.prefetch": 0, "optim.warmup_steps": 0, "optim.grad_clip_norm": 0, "optim.muon_rms": 0,
    "train.eval_every": 0,
    "train.checkpoint_every": 0, "train.keep_every": 0, "train.spike_window": 2,
    "mesh.dcn_data": 1, "mesh.dcn_fsdp": 1,
}
POSITIVE_OR_MINUS_ONE = {"data.num_epochs": "forever", "model.pipeline_microbatches": "as many as stages"}
FRACTIONS = {  # key -> (low, high, whether high is allowed)
    "data.eval_fraction": (0, 1, False),
    "optim.end_lr_fraction": (0, 1, True),
    "optim.lion_b1": (0, 1, True),
    "optim.lion_b2": (0, 1, False),
    "optim.muon_beta": (0, 1, False),
    "train.mask_fraction": (0, 1, True),
    "train.distill_weight": (0, 1, True),
}


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and what to do."""


def error_line(error: BaseException | str) -> str:
  """``error: <message>`` on one line (a list of skipped records or bad steps joined by ';'),
  as the command line and the tools print a mistake the user can fix."""
  return "error: " + re.sub(r"\s*\n\s*", "; ", str(error).strip()).replace(":; ", ": ")


def default_config() -> ml_collections.ConfigDict:
  """The defaults every config starts from (a tiny CPU model on the default corpus)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init and the data shuffles (not which documents are held out)

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 1024  # must equal the tokenizer's vocabulary size (a generated tokenizer gets this size)
  m.num_layers = 2  # l: decoder blocks (stacked and scanned)
  m.embed_dim = 128  # d: residual stream width
  m.num_heads = 4  # n: query heads
  m.num_kv_heads = 2  # k: key/value heads (GQA); must divide num_heads
  m.head_dim = 32  # h: per-head width
  m.mlp_dim = 384  # f: MLP hidden width (of the SwiGLU gate/up or the GELU up projection)
  m.max_seq_len = 128  # longest sequence: data.seq_len and generation fit in it; rows of the learned position table
  m.rope_theta = 10000.0  # RoPE base frequency
  m.rope_scaling = "none"  # RoPE frequency scaling: none | linear (positions / factor) | llama3 (Llama 3.1+) | yarn
  m.rope_scaling_factor = 8.0  # linear / llama3 / yarn: how much longer the context becomes
  m.rope_low_freq_factor = 1.0  # llama3: wavelengths over original_max_len / this are divided by the factor
  m.rope_high_freq_factor = 4.0  # llama3: wavelengths under original_max_len / this are kept
  m.rope_original_max_len = 8192  # llama3 / yarn: the context length the model was trained at
  m.rope_beta_fast = 32.0  # yarn: frequencies turning more than this many times in original_max_len are kept
  m.rope_beta_slow = 1.0  # yarn: those turning fewer times are divided by the factor; a linear ramp between
  m.rope_truncate = True  # yarn: round the ramp's ends to whole dimensions (floor, ceil)
  m.rope_attention_factor = 0.0  # yarn: multiplies cos and sin; 0: 0.1 ln(factor) + 1, or the mscale ratio
  m.rope_mscale = 0.0  # yarn, with rope_mscale_all_dim (both > 0): attention factor g(mscale) / g(mscale_all_dim)
  m.rope_mscale_all_dim = 0.0  # yarn: see rope_mscale; g(x) = 0.1 x ln(factor) + 1 (DeepSeek); 0: unset
  m.position_embedding = "rope"  # rope | learned (a max_seq_len x d table added to the input, GPT-2) | none
  m.norm = "rmsnorm"  # rmsnorm (Llama) | layernorm (mean-centred, with a bias; GPT-2)
  m.norm_eps = 1e-6  # epsilon of every norm
  m.mlp = "swiglu"  # swiglu: down(silu(x gate) * x up) | gelu: down(gelu_tanh(x up)) (GPT-2)
  m.attention_bias = False  # biases on the q, k, v and output projections (GPT-2)
  m.mlp_bias = False  # biases on the MLP projections (GPT-2)
  m.sliding_window = 0  # each token attends to at most this many latest tokens, itself included (Mistral); 0 = all
  m.tie_embeddings = True  # output projection shares the token embedding
  m.param_dtype = "float32"  # master weights
  m.compute_dtype = "float32"  # activations and matmuls ("bfloat16" on accelerators)
  m.remat = "none"  # rematerialisation per block: none | full | dots | dots_no_batch
  m.scan_layers = True  # stack blocks and run them with lax.scan (flat compile time)
  m.pipeline_microbatches = -1  # microbatches per pipeline pass when mesh.stage > 1; -1 = stages
  m.pipeline_repeats = 1  # circular pipeline: layer chunks per stage (1 = GPipe)
  m.pipeline_schedule = "gpipe"  # gpipe: autodiff through the forward loop (memory grows with microbatches) | 1f1b: one forward, one backward per tick (memory bounded by stages)
  m.attention = "xla"  # xla | blockwise (any platform; memory-efficient) | cudnn (NVIDIA GPU, bf16) | splash (TPU)
  m.context_attention = "ring"  # with mesh.context > 1: ring (key/value blocks passed around) | allgather (keys/values gathered)
  m.context_load_balance = True  # with mesh.context > 1: each device holds sequence chunks i and 2C-1-i (equal causal work)
  m.quantization = "none"  # attention/MLP projection matmuls: none | fp8 (e4m3 operands, e5m2 gradients, per-tensor current scaling)
  m.init_std = 0.02  # normal init std of embeddings and projections
  m.num_experts = 0  # E: mixture-of-experts feed-forward blocks with E routed experts; 0 = a dense MLP in every layer
  m.experts_per_token = 2  # k: routed experts each token goes through
  m.expert_mlp_dim = 0  # hidden width of each expert (SwiGLU/GELU as model.mlp); 0 = mlp_dim
  m.num_shared_experts = 0  # experts every token goes through besides its k (DeepSeek): one MLP num_shared_experts x expert_mlp_dim wide
  m.first_dense_layers = 0  # the first layers keep a dense MLP of mlp_dim (DeepSeek's first_k_dense_replace)
  m.moe_every = 1  # after those, every moe_every-th layer is MoE and the rest dense (1 = all)
  m.router = "softmax"  # softmax over experts, top-k weights renormalised (Mixtral) | sigmoid: scores + a balancing bias pick, scores weigh (DeepSeek-V3)
  m.router_scale = 1.0  # routed experts' output x this (DeepSeek-V3's routed_scaling_factor)
  m.capacity_factor = 0.0  # 0 = dropless; > 0: an expert takes at most ceil(factor x t x k / E) of a sequence's assignments, the overflow is dropped (counted)
  m.moe_aux_loss = 0.01  # weight of the load-balancing loss E * sum_i f_i P_i (Switch; 1 x k when balanced), mean over MoE layers
  m.moe_z_loss = 0.001  # weight of the router z-loss, logsumexp(router logits)^2 (ST-MoE)
  m.router_bias_rate = 0.001  # sigmoid router: after each update the bias of an over-(under-)loaded expert falls (rises) by this (DeepSeek-V3)
  m.causal = True  # False: each token attends to its whole document, both ways (train.objective="masked")
  m.lora_rank = 0  # LoRA: rank r of low-rank adapters on model.lora_targets; > 0 freezes every other weight
  m.lora_alpha = 16.0  # LoRA: an adapter adds (alpha / r) x A B to its projection
  m.lora_targets = ("q", "v")  # LoRA: adapted projections, of q, k, v, o (attention) and gate, up, down (MLP)
  m.loss_chunk = 1024  # the loss walks the sequence this many positions at a time, never holding the (b, t, v) logits; 0 = whole logits

  c.data = d = ml_collections.ConfigDict()
  d.source = "default"  # "default", a file/dir/glob of .txt .jsonl .json .parquet .arrayrecord files, or a tools/prepare_data.py directory
  d.mixture = ()  # ((source, weight), ...): rows drawn from each source in proportion; replaces source when set
  d.text_field = "text"  # JSONL / Parquet / ArrayRecord field holding the document text
  d.format = "text"  # text (documents) | prompt_response (JSONL pairs; loss on the response) | chat (JSONL conversations; loss on assistant turns) | preference (JSONL prompt, chosen, rejected; train.objective="dpo")
  d.prompt_field = "prompt"  # prompt_response, preference: JSONL field of the prompt
  d.response_field = "response"  # prompt_response: JSONL field of the response
  d.messages_field = "messages"  # chat: JSONL field of the conversation, [{"role": ..., "content": ...}, ...]
  d.chat_template = ""  # chat (and lmjax chat): "" = the tokenizer's own (an HF import's), else a built-in name or a .jinja file
  d.chosen_field, d.rejected_field = "chosen", "rejected"  # preference: JSONL fields of the preferred and the other response
  d.txt_split = "file"  # .txt documents: "file" (one per file) or "blank_line" (one per blank-line-separated block)
  d.bad_records = "skip"  # empty/undecodable/malformed records, missing paths: "skip" (counted in metrics) or "fail"
  d.long_documents = "split"  # documents over seq_len tokens: "split" over rows, "truncate", "skip" (counted) or "fail" (prompt_response examples are cut)
  d.eval_fraction = 0.05  # fraction of documents (or prompt/response pairs) held out for the eval loss; prepared data was split when prepared
  d.seq_len = 128  # tokens per packed row
  d.global_batch_size = 16  # rows per step across all processes
  d.shuffle = True  # shuffle documents (raw), rows (prepared) or pairs (prompt_response), differently each epoch
  d.num_epochs = -1  # -1 repeats forever (training stops at train.steps)
  d.tokenizer = ""  # a sentencepiece .model, a Hugging Face tokenizer.json or a tiktoken .tiktoken file; "" = a prepared source's, else train.init_from's run's, else one trained and cached for the source
  d.tokenizer_cache = ""  # directory for generated tokenizers; "" = $LMJAX_CACHE or ~/.cache/lmjax
  d.worker_count = 0  # Grain worker processes (0 = in the main process)
  d.prefetch = 2  # batches prefetched ahead of the step

  c.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"  # adamw | adafactor (factored second moments) | lion | muon (orthogonalised block matrices, AdamW for the rest)
  o.learning_rate = 3e-3  # peak learning rate
  o.schedule = "cosine"  # after a linear warmup: cosine | wsd (stable, then decay) | constant | linear (decay)
  o.warmup_steps = 20  # linear warmup from 0
  o.decay_steps = -1  # cosine / linear decay length after warmup; <= 0 = train.steps - warmup_steps
  o.decay_fraction = 0.2  # wsd: the decay takes this last fraction of train.steps
  o.decay_shape = "1-sqrt"  # wsd decay: linear | cosine | 1-sqrt (1 - sqrt(progress), Hägele et al. 2024)
  o.end_lr_fraction = 0.1  # final lr as a fraction of the peak (cosine, linear, wsd)
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1  # decoupled weight decay, multiplied by the learning rate (every optimizer)
  o.decay_norms_and_embeddings = False  # also decay norm scales and embeddings
  o.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  o.grad_accum_steps = 1  # microbatches accumulated per update
  o.lion_b1 = 0.9  # lion: interpolation between momentum and gradient for the sign (Chen et al. 2023)
  o.lion_b2 = 0.99  # lion: momentum decay
  o.muon_beta = 0.95  # muon: momentum of the orthogonalised matrices (b1, b2, eps: its AdamW part's)
  o.muon_ns_steps = 5  # muon: Newton-Schulz iterations
  o.muon_rms = 0.2  # muon: update RMS as AdamW's (Moonlight), so AdamW's lr carries over; 0 = Jordan's scale (lr ~0.02)
  o.lr_multipliers = ()  # ((regex, multiplier >= 0), ...): lr (and decay) x multiplier of the first regex found in a param's path

  c.train = t = ml_collections.ConfigDict()
  t.steps = 200  # optimizer updates
  t.log_every = 10  # steps between metric writes
  t.eval_every = 100  # steps between eval-loss runs (on log steps, and the last step); 0 disables
  t.eval_batches = 4  # batches per eval run
  t.checkpoint_every = 100  # steps between checkpoints; 0 = only at the end (and on SIGTERM/SIGINT)
  t.keep_checkpoints = 3  # newest checkpoints kept
  t.keep_every = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none
  t.async_checkpointing = True  # save in the background while training continues
  t.progress_bar = True  # tqdm bar on process 0
  t.peak_flops_per_device = 0.0  # for MFU; 0 = look up the device kind, else no MFU
  t.trackers = ("tensorboard",)  # metric writers besides metrics.jsonl (always): tensorboard, wandb, mlflow (pip install "lmjax[wandb]" / "lmjax[mlflow]")
  t.project, t.run_name = "", ""  # W&B project / MLflow experiment ("" = $WANDB_PROJECT / $MLFLOW_EXPERIMENT_NAME, else "lmjax"); run name ("" = the workdir's name)
  t.z_loss = 0.0  # weight of the z-loss, z * logsumexp(logits)^2 per token (PaLM: 1e-4); reported as z_loss
  t.nan_policy = "halt"  # non-finite loss/grads: "halt" (raise naming the step) | "skip" (count)
  t.skip_spikes = False  # skip updates whose loss exceeds mean + spike_threshold * std
  t.spike_window = 32  # steps in the rolling loss mean/std for spike detection
  t.spike_threshold = 6.0  # spike threshold in standard deviations
  t.spike_max_consecutive = 8  # spikes skipped in a row before a new loss level is accepted: apply, restart the window
  t.init_from = ""  # fine-tuning: a run directory whose checkpoint's parameters (and tokenizer, if data.tokenizer is "") start this run
  t.init_step = -1  # the step of init_from to use; -1 = newest usable
  t.objective = "causal"  # causal (next token) | masked (masked LM: model.causal=False) | dpo (preference pairs against a frozen reference)
  t.mask_fraction = 0.15  # masked: fraction of tokens selected; of those 80% masked, 10% a random token, 10% kept
  t.mask_token = ""  # masked: the mask token's text; "" = the tokenizer's unknown-token id
  t.dpo_beta = 0.1  # dpo: the beta of -log sigmoid(beta x (policy - reference) log-ratio margin)
  t.reference = ""  # dpo: the frozen reference run (a run directory); "" = train.init_from
  t.teacher = ""  # distillation: a run directory whose frozen model's logits the student learns from; "" = none
  t.teacher_step = -1  # distillation: the teacher's step; -1 = newest usable
  t.distill_weight = 0.5  # distillation: loss = (1 - w) x cross-entropy + w x T^2 x KL(teacher_T || student_T)
  t.distill_temperature = 1.0  # distillation: T, dividing both models' logits
  t.debug_nan_at_step = 0  # fault injection for tests: that step's loss and grads are NaN

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = 1  # pure data parallelism (parameters replicated)
  ms.stage = 1  # pipeline stages
  ms.fsdp = -1  # fully-sharded data parallelism; -1 fills the remaining devices
  ms.expert = 1  # expert parallelism: MoE experts split over it, tokens sent to their experts (all-to-all); a batch axis elsewhere
  ms.context = 1  # context parallelism: every activation's sequence split over it (attention: model.context_attention)
  ms.tensor = 1  # tensor (model) parallelism
  ms.sequence_parallel = False  # with tensor > 1: the residual stream and norms split along the sequence over tensor (Megatron)
  ms.rules = ()  # ((logical_name, mesh_axes), ...) overriding the default rules table
  ms.dcn_data = 1  # of mesh.data, groups across slices/nodes (slow network, outermost)
  ms.dcn_fsdp = 1  # of mesh.fsdp, groups across slices/nodes
  return c


def _fits(default: Any, value: Any) -> bool:
  """Whether ``value`` may stand where the field's default is ``default``."""
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True


def _tuples(value: Any) -> Any:
  """``value`` with every list turned into a tuple (ConfigDict fields hold tuples)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _parse_text(text: str, default: Any) -> Any:
  """A command-line string for a non-string field: true/false, JSON or a Python literal."""
  if isinstance(default, bool):
    word = text.strip().lower()
    if word not in ("true", "false"):
      raise ValueError(text)
    return word == "true"
  try:
    return json.loads(text)
  except ValueError:
    return ast.literal_eval(text.strip())  # tuples, 1_000, ...


def override(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets the dotted ``key`` (e.g. ``"model.num_layers"``) of ``cfg`` in place, checked.

  A string for a non-string field is parsed (bool: true/false in any case; int, float,
  tuple: JSON or a Python literal); lists become tuples; an int for a float field becomes a
  float. An unknown section or key, or a value that does not fit the field's type, raises
  ConfigError naming the key.
  """
  *parents, leaf = key.split(".")
  node = cfg
  for i, part in enumerate(parents):
    section = ".".join(parents[:i])
    if part not in node:
      known = ", ".join(sorted(node.keys()))
      raise ConfigError(f"config.{key}: unknown key. Known keys under {section or 'config'}: {known}.")
    if not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f"config.{'.'.join(parents[:i + 1])}: not a config section, so "
                        f"config.{key} does not exist.")
    node = node[part]
  if leaf not in node:
    known = ", ".join(sorted(node.keys()))
    raise ConfigError(f"config.{key}: unknown key. Known keys under {'.'.join(parents) or 'config'}: "
                      f"{known}.")
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"config.{key}: a config section; set its keys, e.g. "
                      f"config.{key}.{next(iter(current.keys()), 'KEY')}.")
  expected = type(current).__name__
  if isinstance(value, str) and current is not None and not isinstance(current, str):
    try:
      value = _parse_text(value, current)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      raise ConfigError(f"config.{key}: cannot set {value!r}: expected {expected}.") from None
  value = _tuples(value)
  if current is not None and not _fits(current, value):
    raise ConfigError(f"config.{key}: cannot set {value!r}: expected {expected}, "
                      f"got {type(value).__name__}.")
  if isinstance(current, float):
    value = float(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{key}: cannot set {value!r}: {e}") from None


def with_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``cfg`` with each dotted key of ``overrides`` set by :func:`override`."""
  cfg = copy.deepcopy(cfg)
  for key, value in overrides.items():
    override(cfg, key, value)
  return cfg


def _flat(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, name + "."))
    else:
      out[name] = value
  return out


def _fail(key: str, msg: str) -> None:
  raise ConfigError(f"config.{key}: {msg}")


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks ``cfg`` against the defaults and itself; raises ConfigError naming the key.

  ``num_devices``, when given, checks that the mesh covers exactly that many devices.
  """
  defaults = _flat(default_config())
  given = _flat(cfg)
  for key in given:
    if key not in defaults:
      parent = key.rsplit(".", 1)[0] if "." in key else ""
      known = sorted(k.rsplit(".", 1)[-1] for k in defaults if k.startswith(parent + ".")) if parent else []
      hint = f" Known keys under {parent}: {', '.join(known)}." if known else ""
      _fail(key, f"unknown key.{hint}")
  for key in defaults:
    if key not in given:
      _fail(key, "missing; start configs from lmjax.config.default_config().")
  for key, default in defaults.items():
    value = given[key]
    if not _fits(default, value):
      _fail(key, f"expected {type(default).__name__}, got {value!r} ({type(value).__name__}).")

  for key, allowed in CHOICES.items():
    if given[key] not in allowed:
      _fail(key, f"must be one of {allowed}, got {given[key]!r}." + CHOICE_HINTS.get(given[key], ""))
  for key in POSITIVE:
    if given[key] <= 0:
      _fail(key, f"must be positive, got {given[key]}.")
  for key, least in AT_LEAST.items():
    if given[key] < least:
      _fail(key, f"must be >= {least}, got {given[key]}.")
  for key, meaning in POSITIVE_OR_MINUS_ONE.items():
    if given[key] == 0 or given[key] < -1:
      _fail(key, f"must be positive or -1 ({meaning}), got {given[key]}.")
  for key, (low, high, closed) in FRACTIONS.items():
    if not (low <= given[key] <= high if closed else low <= given[key] < high):
      _fail(key, f"must be in [{low}, {high}{']' if closed else ')'}, got {given[key]}.")
  for axis in MESH_AXES:
    if given[f"mesh.{axis}"] == 0 or given[f"mesh.{axis}"] < -1:
      _fail(f"mesh.{axis}", f"must be a positive size or -1 (fill), got {given[f'mesh.{axis}']}.")

  # Relations between fields.
  m, d, o = cfg.model, cfg.data, cfg.optim
  relations.check_model(m, d, _fail)
  relations.check_objective(cfg, _fail)
  if d.seq_len > m.max_seq_len:
    _fail("data.seq_len", f"must be in [1, model.max_seq_len={m.max_seq_len}], got {d.seq_len}.")
  for i, entry in enumerate(d.mixture):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
            and entry[0] and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)
            and entry[1] > 0):
      _fail(f"data.mixture[{i}]", f"must be (source, weight > 0), got {entry!r}.")
  if not 0 < o.decay_fraction <= 1:
    _fail("optim.decay_fraction", f"must be in (0, 1], got {o.decay_fraction}.")
  if o.schedule == "wsd" and o.warmup_steps + wsd_decay_steps(cfg) > cfg.train.steps:
    _fail("optim.decay_fraction", f"the wsd decay ({wsd_decay_steps(cfg)} steps, {o.decay_fraction} of "
                                  f"train.steps) and optim.warmup_steps ({o.warmup_steps}) exceed "
                                  f"train.steps ({cfg.train.steps}); lower one of them.")
  for i, entry in enumerate(o.lr_multipliers):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool) and entry[1] >= 0):
      _fail(f"optim.lr_multipliers[{i}]", f"must be (regex, multiplier >= 0), got {entry!r}.")
    try:
      re.compile(entry[0])
    except re.error as e:
      _fail(f"optim.lr_multipliers[{i}]", f"invalid regex {entry[0]!r}: {e}.")
  sizes = [cfg.mesh[a] for a in MESH_AXES]
  if sizes.count(-1) > 1:
    _fail("mesh", f"at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  for i, rule in enumerate(cfg.mesh.rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      _fail(f"mesh.rules[{i}]", f"must be (logical_name, mesh_axes), got {rule!r}.")
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for a in axes:
      if a is not None and a not in MESH_AXES:
        _fail(f"mesh.rules[{i}]", f"unknown mesh axis {a!r}; mesh axes are {MESH_AXES}.")
  if num_devices is not None:
    shape = dict(zip(MESH_AXES, resolve_mesh_shape(cfg, num_devices)))
    for axis in ("data", "fsdp"):
      if shape[axis] % cfg.mesh[f"dcn_{axis}"]:
        _fail(f"mesh.dcn_{axis}", f"mesh.{axis}={shape[axis]} is not divisible into "
                                  f"{cfg.mesh[f'dcn_{axis}']} groups across slices/nodes.")
    relations.check_parallelism(cfg, shape, _fail)

def wsd_decay_steps(cfg: ml_collections.ConfigDict) -> int:
  """Steps of the wsd schedule's decay: ``optim.decay_fraction`` of ``train.steps``, at least 1."""
  return max(round(cfg.optim.decay_fraction * cfg.train.steps), 1)


def resolve_mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Mesh sizes in MESH_AXES order with -1 filled; raises ConfigError if they don't cover the devices."""
  sizes = [cfg.mesh[a] for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      _fail("mesh", f"the fixed axes {dict(zip(MESH_AXES, sizes))} multiply to {known}, "
                    f"which does not divide the {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  elif known != num_devices:
    _fail("mesh", f"axis sizes {dict(zip(MESH_AXES, sizes))} multiply to {known}, but there are "
                  f"{num_devices} devices; make the product equal or set one axis to -1.")
  return tuple(sizes)


def from_saved(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """``lmjax.config.default_config()`` updated with a saved config's values."""
  cfg = default_config()

  def update(node: ml_collections.ConfigDict, values: dict[str, Any], prefix: str) -> None:
    for key, value in values.items():
      if key not in node:
        raise ConfigError(f"config.{prefix}{key}: in the run's saved config but not "
                                     "in this lmjax's; give the config explicitly.")
      if isinstance(node[key], ml_collections.ConfigDict):
        update(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = value

  update(cfg, saved, "")
  return cfg

