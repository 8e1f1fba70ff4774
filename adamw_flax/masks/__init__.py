"""Path rules: which parameters get weight decay, which learning-rate multiplier, which are frozen.

One ordered list of ``(selector, value)`` rules answers each of these questions.
For every parameter the rules are tried in order and **the first rule whose
selector matches gives the value**. Put specific rules first and a catch-all
(``"*"``) last.

Parameter paths
  Each parameter is named by its path, the keys from the root joined by
  ``"/"``: ``model.blocks[0].attn.query.kernel`` of an NNX model is
  ``"blocks/0/attn/query/kernel"``; ``params["Dense_0"]["kernel"]`` of a Linen
  model is ``"Dense_0/kernel"`` (``"params/Dense_0/kernel"`` when the tree
  still holds the ``'params'`` collection level). The ``.value`` of NNX
  Variables (and of Linen ``Partitioned`` boxes) is not part of the path.
  ``python -m train.inspect --config=...`` or :func:`report` prints every
  path with the module that owns it.

Selectors
  * glob (the default), matched with :func:`fnmatch.fnmatchcase`, where ``*``
    also crosses ``"/"``. A glob **without** ``"/"`` is matched against the
    parameter's name (the last path component), one with ``"/"`` against the
    whole path: ``"bias"`` and ``"*/bias"`` select every bias (the first also a
    top-level one), ``"embed/*"`` everything under ``embed``, ``"*"`` all.
  * ``"re:<regex>"``: :func:`re.fullmatch` on the whole path, e.g.
    ``"re:.*norm.*/scale"`` or ``"re:blocks/(0|1)/.*"``.
  * ``"type:<Class>"``: the class of the module that owns the parameter, by
    its name or the name of any base class, so one name covers NNX and Linen
    (``"type:LayerNorm"`` is ``nnx.LayerNorm`` and ``nn.LayerNorm``) and
    subclasses (``"type:Linear"`` covers ``nnx.LoRALinear``). ``|`` lists
    alternatives: ``"type:LayerNorm|RMSNorm|BatchNorm"``. The owner is the
    nearest enclosing module (``nnx.List``/``nnx.Dict`` containers are skipped).
    Type rules need the model: pass ``target=`` (an ``nnx.Module``, or
    :func:`linen_target` for Linen, also for a Linen module wrapped in
    ``nnx.bridge.ToNNX``, whose inner classes NNX does not see). A model
    built by :func:`adamw_flax.state_factory` (``python -m train``) needs
    nothing: the Linen classes are recorded while it is built
    (:class:`LinenTypeRecorder`, :func:`module_target`).
  * ``"ndim>=2"`` (also ``>``, ``<``, ``<=``, ``==``, ``!=``): the number of
    dimensions of the parameter. Prefer paths and types: a stacked (scanned)
    layer adds a dimension, so its biases and norm scales have ``ndim == 2``.
  * ``"A & B"`` (spaces around ``&``): all of them, e.g.
    ``"type:Linear & kernel"``.

Values
  ``bool`` for weight decay (``True`` = decay) and for frozen (``True`` =
  frozen); a non-negative ``float`` for learning-rate multipliers.

Writing rules (any of these forms; see :func:`parse_rules`)
  * a preset: ``"default"``, ``"all"``, ``"none"`` (for frozen: ``"none"``);
  * pairs: ``[("*/bias", False), ("type:Embed", False), ("*", True)]``, or a
    dict in insertion order;
  * one string, handy on the command line:
    ``--config.optimizer.weight_decay_mask='bias=false, type:Embed=false, *=true'``.

The ``"default"`` weight-decay preset decays the ``kernel`` of linear-like
layers (NNX ``Linear``, ``LinearGeneral``, ``Einsum``, ``Conv``,
``ConvTranspose``; Linen ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``,
``ConvTranspose``, and ``DenseParams``, where Linen's ``OptimizedLSTMCell``
keeps its gate kernels; so the recurrent kernels of Linen's and NNX's LSTM
cells decay alike) and nothing else: no biases, no norm scales, no embeddings,
no custom ``nnx.Param`` outside those layers (a model without any such kernel
is an error: write rules for it). ``"all"`` decays everything and ``"none"``
nothing.

Mistakes are errors, raised when the rules are applied:
  * a rule that matches no parameter (a typo must not silently decay
    everything), and a rule whose every match is taken by an earlier rule (the
    order is wrong); the catch-all ``"*"`` is exempt;
  * a parameter no weight-decay rule matches (end the rules with ``"*"``);
    learning-rate multipliers default to 1 and frozen to ``False``;
  * a type rule without the model to read types from.

Masks are callables, not trees: :func:`weight_decay_mask` returns a function
that optax calls on whatever tree it is given (``nnx.State`` with Variable
leaves inside ``nnx.Optimizer``, the pure arrays of ``optimizer.update``, a
Linen params dict in a ``TrainState``) and that answers with a tree of the same
structure. A mask tree built ahead from ``nnx.split`` params has a different
structure from what ``nnx.Optimizer`` hands to optax and fails there
(jax#31256, flax#5372).

Examples:
  >>> import jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> from adamw_flax import masks
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.embed = nnx.Embed(10, 4, rngs=rngs)
  ...     self.dense = nnx.Linear(4, 4, rngs=rngs)
  ...     self.norm = nnx.LayerNorm(4, rngs=rngs)
  >>> model = Net(nnx.Rngs(0))
  >>> masks.path_values(model, "default")
  {'dense/bias': False, 'dense/kernel': True, 'embed/embedding': False, 'norm/bias': False, 'norm/scale': False}
  >>> masks.path_values(model, "bias=false, type:LayerNorm=false, *=true")
  {'dense/bias': False, 'dense/kernel': True, 'embed/embedding': True, 'norm/bias': False, 'norm/scale': False}
  >>> mask = masks.weight_decay_mask("default", target=model)
  >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.1, mask=mask), wrt=nnx.Param)
  >>> masks.path_values(model, "*/bias=true")
  Traceback (most recent call last):
  ...
  ValueError: weight decay: no rule matches 'dense/kernel', 'embed/embedding', 'norm/scale'; end the rules with a catch-all such as '*=false'
"""

from adamw_flax.masks.paths import (
  LinenTarget,
  LinenTypeRecorder,
  Target,
  as_target,
  key_str,
  linen_target,
  module_target,
  path_str,
  tree_paths,
)
from adamw_flax.masks.report import ReportRow, placement, report, report_rows
from adamw_flax.masks.resolve import (
  RuleFn,
  frozen_fn,
  lr_multiplier_fn,
  path_values,
  resolve,
  weight_decay_mask,
  weight_decay_strengths,
)
from adamw_flax.masks.rules import (
  DECAY,
  DEFAULT_DECAY_TYPES,
  PRESETS,
  Rule,
  is_boolean,
  parse_partition_rules,
  parse_rules,
  partition_selector,
  to_partition_spec,
)

__all__ = [
  "DEFAULT_DECAY_TYPES",
  "PRESETS",
  "LinenTarget",
  "LinenTypeRecorder",
  "ReportRow",
  "Rule",
  "RuleFn",
  "Target",
  "as_target",
  "frozen_fn",
  "key_str",
  "linen_target",
  "lr_multiplier_fn",
  "module_target",
  "parse_partition_rules",
  "parse_rules",
  "partition_selector",
  "path_str",
  "path_values",
  "placement",
  "report",
  "report_rows",
  "resolve",
  "to_partition_spec",
  "tree_paths",
  "weight_decay_mask",
  "weight_decay_strengths",
  "DECAY",
  "is_boolean",
]
