"""The notebooks' graded exercises, one module per notebook (the machinery is `qwen2np.teaching.grader`).

Every `grade_*` takes the reader's function (and what it needs to run it), and returns a `Verdict` that
prints as a short report naming the first wrong step; none raises on an answer.
"""

from .attention import grade_attention_head, grade_causal_mask, grade_multi_head, grade_padded_mask, grade_softmax
from .tokenizer import grade_bpe, grade_bpe_training, grade_byte_level, grade_decode
from .layer import grade_decoder_layer, grade_gqa, grade_kv_cache_step, grade_rms_norm, grade_rope
from .generation import (grade_draw, grade_greedy, grade_last_token, grade_lm_loss, grade_repetition_penalty,
                         grade_top_k, grade_top_p)
from .inspection import grade_head_attribution, grade_induction_scores, grade_logit_lens
from .porting import grade_first_divergence, grade_q4k_block
from .training import grade_rms_norm_backward, grade_softmax_backward
