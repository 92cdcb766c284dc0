"""Scalar heads on a transformer trunk: the Q-model Q(s, a) and the PPO critic V(s_t).

Both are the same module: the decoder trunk of ``models/transformer.py`` (no LM head) followed by
a linear map D -> 1 at every token. The Q-model reads its value at the last action token; the
critic uses the per-token values for GAE. ``scalar_model_from_policy`` warm-starts the trunk from
the policy's weights, the usual initialisation of a critic / reward model in RLHF.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from iterppo_jax.models.transformer import Trunk, TransformerConfig, logical_param

Array = jax.Array


class ScalarModel(nnx.Module):
  """Transformer trunk + linear head D -> 1, one scalar per token.

  With ``dueling=True`` (a Q-model only) a second head reads the state's last token: Q(s, a) = V(s) + A(s, a),
  V from the hidden state at the end of the prompt (which, the trunk being causal, cannot see the action) and A
  from the hidden state at the action's end (``q_and_v``). V carries what the state alone says about the outcome,
  so A has to explain the differences between actions at a state: what the improvement step uses.
  """

  @staticmethod
  def head_names(dueling: bool = False) -> tuple[str, ...]:
    """The head's parameters (trained in full next to LoRA adapters on the trunk: lora.LoraConfig.train_full)."""
    return ("head_kernel", "head_bias") + (("value_kernel", "value_bias") if dueling else ())

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, dueling: bool = False):
    self.config = config
    self.dueling = dueling
    self.trunk = Trunk(config, rngs=rngs)
    # Small init: values start near 0 (probability 0.5 under a sigmoid) whatever the trunk says.
    self.head_kernel = logical_param(rngs, nnx.initializers.normal(0.02), (config.embed_dim, 1),
                                     ('embed', None), config.param_dtype)
    self.head_bias = logical_param(rngs, nnx.initializers.zeros, (1,), (None,),
                                   config.param_dtype)
    if dueling:
      self.value_kernel = logical_param(rngs, nnx.initializers.normal(0.02), (config.embed_dim, 1),
                                        ('embed', None), config.param_dtype)
      self.value_bias = logical_param(rngs, nnx.initializers.zeros, (1,), (None,), config.param_dtype)

  def __call__(self, tokens: Array, positions: Array, attn_mask: Optional[Array] = None, *,
               valid: Optional[Array] = None, out_slots: Any = None) -> Array:
    """Per-token scalars.

    Args:
      tokens: [B,T] int32.
      positions: [B,T] int32.
      attn_mask: optional [B,T,T] bool (default causal).
      valid: optional [B,T] bool, False at padding (ANDed into the mask).
      out_slots: optional slots to compute, as in ``Trunk.__call__`` (T -> M): the critic reads the
        response slots, the Q-model each row's last token.

    Returns:
      values: [B,T] (or [B,M]) float32. Entries at padding are meaningless; mask them in the loss.
    """
    hidden, _ = self.trunk(tokens, positions, attn_mask, valid=valid, out_slots=out_slots)
    return self._head(hidden, self.head_kernel, self.head_bias)

  def _head(self, hidden: Array, kernel: Any, bias: Any) -> Array:
    values = jnp.einsum('BTD,DO->BTO', hidden, kernel[...].astype(hidden.dtype), preferred_element_type=jnp.float32)
    return values[..., 0] + bias[...].astype(jnp.float32)[0]

  def q_and_v(self, tokens: Array, positions: Array, *, valid: Array, state_index: Array,
              last_index: Array) -> Tuple[Array, Array]:
    """(Q [B], V [B]) raw outputs of a dueling model: V at each row's `state_index` (the prompt's last token),
    Q = V + A with A at `last_index` (the action's last token). One trunk pass computes both slots."""
    if not self.dueling:
      raise ValueError("q_and_v needs a dueling ScalarModel (dueling=True)")
    slots = jnp.stack([state_index, last_index], axis=1).astype(jnp.int32)
    hidden, _ = self.trunk(tokens, positions, valid=valid, out_slots=slots)
    value = self._head(hidden[:, :1], self.value_kernel, self.value_bias)[:, 0]
    advantage = self._head(hidden[:, 1:], self.head_kernel, self.head_bias)[:, 0]
    return value + advantage, value


def scalar_model_from_policy(policy: Any, *, rngs: nnx.Rngs, dueling: bool = False) -> ScalarModel:
  """A ScalarModel whose trunk starts as a copy of ``policy.trunk`` (a ``Transformer``).

  The arrays are copied, not shared: a train step that donates the policy's buffers would
  otherwise delete the critic's weights too.
  """
  model = ScalarModel(policy.config, rngs=rngs, dueling=dueling)
  trunk_state = nnx.state(policy.trunk, nnx.Param)
  nnx.update(model.trunk, jax.tree.map(jnp.copy, trunk_state))
  return model
