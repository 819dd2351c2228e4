// `decode_step`: one whole decode step of a decoder-only MoE transformer on the CPU, in C++.
//
// A decode step feeds one new token per row (B rows) through every layer. Its products are bound by
// reading the weights (rows_mm_cpu.h streams them at the memory's speed), so what costs time beside
// them is the host work between the ~40 small ops of a layer when transformers' modules run them one
// by one from Python. This op runs the whole step without Python: for each row b
//
//   h = embed[ids[b]]
//   per layer: x = rms(h) * in_norm
//              q, k, v = x Wq^T (+bq), x Wk^T (+bk), x Wv^T (+bv)
//              optional q/k norm: per head (qk_norm = 1, Qwen3-MoE) or over the whole projection
//              (qk_norm = 2, OLMoE); optional clamp to +-clip_qkv (clip_qkv > 0)
//              rotary on q, k (HF rotate-half: cos/sin of positions[b] * inv_freq, times rope_scale)
//              k, v -> kv cache column T-1 of row b (T = mask.size(1))
//              attention of the one query over the columns t < T with mask[b, t] != 0 (GQA),
//              scores times `scaling`; o = attn Wo^T (+bo); h += o
//              x = rms(h) * post_norm
//              routed experts (router given): softmax(x Wr^T) in float, top_k (ties: lower expert
//              first), divided by their sum when norm_topk_prob; per selected expert e:
//              y += w * down_e(silu(gate_e(x)) * up_e(x)), added in ascending expert order
//              shared / dense MLP (shared_up given): s = down(silu(gate(x)) * up(x)), times
//              sigmoid(x Wsg^T) when a shared-expert gate is given; y += s
//              h += y
//   logits[b] = rms(h) * final_norm @ lm_head^T
//
// Layout contract (all float32 CPU, contiguous; an absent optional tensor is an empty tensor):
//   ids [B] int64, positions [B] int64 (the new token's position), mask [B, T] int64 or bool over
//   the cache columns and the new one (left padding = 0).
//   kv: 2 per layer (keys, values), each [B, Hkv, C, D] with C >= T; columns < T-1 hold the cache,
//   the step writes column T-1 (a caller views [:, :, :T] as the cache afterwards).
// A prompt (several new tokens per sequence) is the same computation over one row per new token:
//   slots [R, 2] int64 names each row's cache row and the column its key and value go to (default:
//   row b, column T-1); the kv buffers are then [Bkv, Hkv, C, D] for any Bkv. Every row's key and
//   value are written before any row attends, so with mask[r, t] = 1 only for the columns up to the
//   row's own (and not padding) the rows of one sequence attend causally to each other.
//   logit_rows [N] int64: the rows whose logits are returned (default: all), e.g. each sequence's last.
//   weights: kSlots per layer in the order of `Slot` below. Linear weights are [out, in] rows;
//   gate_up [E, 2I, H] is [gate; up] along dim 1, down [E, H, I].
//   embed [V, H], final_norm [H], lm_head [V', H], inv_freq [D / 2].
// Every product goes through the streaming kernels, cut by output features across threads (all
// products that read the same input run in one parallel region). A row's result does not depend on
// the other rows of the batch nor on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "rows_mm_cpu.h"

namespace moe_runtime {
namespace {

enum Slot : int64_t {
  kInNorm = 0,
  kQ,
  kQBias,
  kK,
  kKBias,
  kV,
  kVBias,
  kO,
  kOBias,
  kQNorm,
  kKNorm,
  kPostNorm,
  kRouter,
  kGateUp,
  kDown,
  kSharedGate,
  kSharedUp,
  kSharedDown,
  kSharedExpertGate,
  kSlots
};

// One product out[i, j] = x[i, :] . w[j, :] for i < m, j < n (w [n, k] row-major).
struct Product {
  const float* x;
  int64_t ldx;
  int64_t m;
  const float* w;
  int64_t k;
  int64_t n;
  float* out;
  int64_t ldo;
};

// All products in one parallel region, cut by blocks of output features across threads.
void run_products(const std::vector<Product>& products) {
  const int64_t block = rows_mm_block(false);
  std::vector<int64_t> starts(products.size() + 1, 0);
  for (size_t p = 0; p < products.size(); ++p) {
    const int64_t n = products[p].m > 0 ? products[p].n : 0;
    starts[p + 1] = starts[p] + (n + block - 1) / block;
  }
  const int64_t total = starts.back();
  if (total == 0) {
    return;
  }
  int64_t bytes = 0;
  for (const Product& q : products) {
    bytes += q.m > 0 ? q.n * q.k * 4 : 0;
  }
  at::parallel_for(0, total, parallel_grain(bytes / total), [&](int64_t begin, int64_t end) {
    size_t p = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
    for (int64_t b = begin; b < end;) {
      while (b >= starts[p + 1]) {
        ++p;
      }
      const Product& q = products[p];
      const int64_t last = std::min(end, starts[p + 1]);
      const int64_t j0 = (b - starts[p]) * block;
      const int64_t j1 = std::min(q.n, (last - starts[p]) * block);
      rows_mm_f32(q.x, q.ldx, q.m, q.w, false, q.k, q.n, j0, j1, q.out, q.ldo);
      b = last;
    }
  });
}

bool present(const at::Tensor& t) {
  return t.defined() && t.numel() > 0;
}

const float* ptr(const at::Tensor& t) {
  return t.const_data_ptr<float>();
}

// out[0:n] = x[0:n] * rsqrt(mean(x^2) + eps) * w (HF's RMSNorm: the mean in float32).
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    sum += x[i] * x[i];
  }
  const float scale = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = w[i] * (x[i] * scale);
  }
}

void add_bias(float* y, const at::Tensor& bias, int64_t rows, int64_t n, int64_t ld) {
  if (!present(bias)) {
    return;
  }
  const float* b = ptr(bias);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      y[r * ld + j] += b[j];
    }
  }
}

float silu(float g) {
  return g / (1.f + std::exp(-g));
}

void check_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "decode_step: ", what, " must be [", rows,
              ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), "decode_step: ", what,
              " must be a contiguous float32 CPU tensor");
}

void check_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "decode_step: ", what, " must be float32 [", n, "], got ", t.sizes(), " ", t.scalar_type());
}

at::Tensor decode_step_cpu(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& mask_in,
                           at::TensorList kv, at::TensorList weights, const at::Tensor& embed,
                           const at::Tensor& final_norm, const at::Tensor& lm_head, const at::Tensor& inv_freq,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t top_k,
                           bool norm_topk_prob, int64_t qk_norm, double eps_d, double scaling_d,
                           double rope_scale_d, double clip_qkv_d, const std::optional<at::Tensor>& slots_in,
                           const std::optional<at::Tensor>& logit_rows_in) {
  const float eps = static_cast<float>(eps_d), scaling = static_cast<float>(scaling_d);
  const float rope_scale = static_cast<float>(rope_scale_d), clip = static_cast<float>(clip_qkv_d);
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "decode_step: ids must be int64 [B]");
  const int64_t B = ids.size(0);
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == B && positions.scalar_type() == at::kLong,
              "decode_step: positions must be int64 [B]");
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.size(0) == B && mask_in.size(1) >= 1, "decode_step: mask must be [B, T]");
  const at::Tensor mask = mask_in.to(at::kLong).contiguous();
  const int64_t T = mask.size(1);
  TORCH_CHECK(!kv.empty(), "decode_step: kv must hold 2 tensors per layer");
  const int64_t Bkv = kv[0].dim() == 4 ? kv[0].size(0) : -1;
  // each row's cache row and column
  std::vector<int64_t> row_of(B), col_of(B, T - 1);
  if (slots_in.has_value() && slots_in->defined()) {
    const at::Tensor slots = slots_in->to(at::kLong).contiguous();
    TORCH_CHECK(slots.dim() == 2 && slots.size(0) == B && slots.size(1) == 2, "decode_step: slots must be [B, 2]");
    const int64_t* sl = slots.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      row_of[b] = sl[2 * b];
      col_of[b] = sl[2 * b + 1];
      TORCH_CHECK(row_of[b] >= 0 && row_of[b] < Bkv && col_of[b] >= 0 && col_of[b] < T,
                  "decode_step: slot (", row_of[b], ", ", col_of[b], ") outside the kv rows or the mask's columns");
    }
  } else {
    TORCH_CHECK(Bkv == B, "decode_step: kv buffers must have B rows without slots");
    for (int64_t b = 0; b < B; ++b) row_of[b] = b;
  }
  std::vector<int64_t> out_rows;
  if (logit_rows_in.has_value() && logit_rows_in->defined()) {
    const at::Tensor picked = logit_rows_in->to(at::kLong).contiguous();
    TORCH_CHECK(picked.dim() == 1, "decode_step: logit_rows must be [N]");
    out_rows.assign(picked.const_data_ptr<int64_t>(), picked.const_data_ptr<int64_t>() + picked.numel());
    for (int64_t r : out_rows) {
      TORCH_CHECK(r >= 0 && r < B, "decode_step: logit row ", r, " outside [0, ", B, ")");
    }
  } else {
    out_rows.resize(B);
    for (int64_t b = 0; b < B; ++b) out_rows[b] = b;
  }
  TORCH_CHECK(weights.size() % kSlots == 0 && !weights.empty(), "decode_step: weights must hold ", kSlots,
              " tensors per layer, got ", weights.size());
  const int64_t L = static_cast<int64_t>(weights.size()) / kSlots;
  TORCH_CHECK(static_cast<int64_t>(kv.size()) == 2 * L, "decode_step: kv must hold 2 tensors per layer");
  TORCH_CHECK(embed.dim() == 2, "decode_step: embed must be [V, H]");
  const int64_t V = embed.size(0), H = embed.size(1);
  check_matrix(embed, V, H, "embed");
  check_vector(final_norm, H, "final_norm");
  TORCH_CHECK(lm_head.dim() == 2, "decode_step: lm_head must be [V, H]");
  const int64_t VO = lm_head.size(0);
  check_matrix(lm_head, VO, H, "lm_head");
  const int64_t D = head_dim, Hq = num_heads, Hkv = num_kv_heads, half = D / 2;
  TORCH_CHECK(D % 2 == 0 && Hq > 0 && Hkv > 0 && Hq % Hkv == 0, "decode_step: bad head settings");
  check_vector(inv_freq, half, "inv_freq");
  TORCH_CHECK(qk_norm >= 0 && qk_norm <= 2, "decode_step: qk_norm must be 0, 1 or 2");
  const int64_t group = Hq / Hkv;

  // Check every layer once, and size the scratch for the widest.
  int64_t max_inter = 0, max_experts = 0, max_shared = 0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + l * kSlots;
    check_vector(w[kInNorm], H, "input norm");
    check_vector(w[kPostNorm], H, "post-attention norm");
    check_matrix(w[kQ], Hq * D, H, "q_proj");
    check_matrix(w[kK], Hkv * D, H, "k_proj");
    check_matrix(w[kV], Hkv * D, H, "v_proj");
    check_matrix(w[kO], H, Hq * D, "o_proj");
    if (present(w[kQBias])) check_vector(w[kQBias], Hq * D, "q bias");
    if (present(w[kKBias])) check_vector(w[kKBias], Hkv * D, "k bias");
    if (present(w[kVBias])) check_vector(w[kVBias], Hkv * D, "v bias");
    if (present(w[kOBias])) check_vector(w[kOBias], H, "o bias");
    if (qk_norm == 1) {
      check_vector(w[kQNorm], D, "q_norm");
      check_vector(w[kKNorm], D, "k_norm");
    } else if (qk_norm == 2) {
      check_vector(w[kQNorm], Hq * D, "q_norm");
      check_vector(w[kKNorm], Hkv * D, "k_norm");
    }
    if (present(w[kRouter])) {
      const int64_t E = w[kRouter].size(0);
      check_matrix(w[kRouter], E, H, "router");
      TORCH_CHECK(top_k >= 1 && top_k <= E, "decode_step: top_k must be in [1, ", E, "]");
      TORCH_CHECK(w[kGateUp].dim() == 3 && w[kGateUp].size(0) == E && w[kGateUp].size(2) == H &&
                      w[kGateUp].size(1) % 2 == 0 && w[kGateUp].is_contiguous() &&
                      w[kGateUp].scalar_type() == at::kFloat,
                  "decode_step: gate_up must be contiguous float32 [E, 2I, H]");
      const int64_t I = w[kGateUp].size(1) / 2;
      TORCH_CHECK(w[kDown].dim() == 3 && w[kDown].size(0) == E && w[kDown].size(1) == H &&
                      w[kDown].size(2) == I && w[kDown].is_contiguous() && w[kDown].scalar_type() == at::kFloat,
                  "decode_step: down must be contiguous float32 [E, H, I]");
      max_inter = std::max(max_inter, I);
      max_experts = std::max(max_experts, E);
    }
    if (present(w[kSharedUp])) {
      const int64_t S = w[kSharedUp].size(0);
      check_matrix(w[kSharedUp], S, H, "shared up_proj");
      check_matrix(w[kSharedGate], S, H, "shared gate_proj");
      check_matrix(w[kSharedDown], H, S, "shared down_proj");
      if (present(w[kSharedExpertGate])) check_matrix(w[kSharedExpertGate], 1, H, "shared_expert_gate");
      max_shared = std::max(max_shared, S);
    }
    const at::Tensor& kc = kv[2 * l];
    const at::Tensor& vc = kv[2 * l + 1];
    for (const at::Tensor* c : {&kc, &vc}) {
      TORCH_CHECK(c->dim() == 4 && c->size(0) == Bkv && c->size(1) == Hkv && c->size(2) >= T && c->size(3) == D &&
                      c->is_contiguous() && c->scalar_type() == at::kFloat,
                  "decode_step: kv buffers must be contiguous float32 [B, Hkv, C >= T, D], got ", c->sizes());
    }
  }
  const at::Tensor ids_c = ids.contiguous(), positions_c = positions.contiguous();  // e.g. a column of [B, S]
  const int64_t* id = ids_c.const_data_ptr<int64_t>();
  const int64_t* pos = positions_c.const_data_ptr<int64_t>();
  const int64_t* mk = mask.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(id[b] >= 0 && id[b] < V, "decode_step: token id ", id[b], " outside the vocabulary");
  }

  // Scratch, reused by every layer.
  const int64_t QD = Hq * D, KD = Hkv * D;
  const int64_t entries = B * std::max<int64_t>(top_k, 1);
  auto opts = embed.options();
  at::Tensor scratch = at::empty(
      {B * (2 * H + QD + 2 * KD + QD + H + max_experts) + entries * (H + 3 * max_inter + H) +
       B * (3 * max_shared + H + 1) + T * at::get_num_threads() + D},
      opts);
  float* hidden = scratch.mutable_data_ptr<float>();
  float* xn = hidden + B * H;
  float* qb = xn + B * H;
  float* kb = qb + QD * B;
  float* vb = kb + KD * B;
  float* attn = vb + KD * B;
  float* ob = attn + QD * B;
  float* router = ob + B * H;
  float* gathered = router + B * max_experts;
  float* gate_up = gathered + entries * H;
  float* act = gate_up + entries * 2 * max_inter;
  float* down = act + entries * max_inter;
  float* shared_gu = down + entries * H;
  float* shared_act = shared_gu + B * 2 * max_shared;
  float* shared_out = shared_act + B * max_shared;
  float* shared_gate = shared_out + B * H;
  float* scores_all = shared_gate + B;
  float* cs = scores_all + T * at::get_num_threads();  // cos then sin of one row: [half] each

  const float* emb = ptr(embed);
  for (int64_t b = 0; b < B; ++b) {
    std::copy(emb + id[b] * H, emb + (id[b] + 1) * H, hidden + b * H);
  }

  std::vector<int64_t> chosen(entries);
  std::vector<float> chosen_w(entries);
  std::vector<int64_t> expert_rows;  // entry order sorted by (expert, row)
  std::vector<float> probs;

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + l * kSlots;
    float* kcache = kv[2 * l].mutable_data_ptr<float>();
    float* vcache = kv[2 * l + 1].mutable_data_ptr<float>();
    const int64_t C = kv[2 * l].size(2);

    // --- attention ---
    for (int64_t b = 0; b < B; ++b) {
      rms_norm(hidden + b * H, ptr(w[kInNorm]), H, eps, xn + b * H);
    }
    run_products({{xn, H, B, ptr(w[kQ]), H, QD, qb, QD},
                  {xn, H, B, ptr(w[kK]), H, KD, kb, KD},
                  {xn, H, B, ptr(w[kV]), H, KD, vb, KD}});
    add_bias(qb, w[kQBias], B, QD, QD);
    add_bias(kb, w[kKBias], B, KD, KD);
    add_bias(vb, w[kVBias], B, KD, KD);
    for (int64_t b = 0; b < B; ++b) {
      float* q = qb + b * QD;
      float* k = kb + b * KD;
      if (qk_norm == 1) {
        for (int64_t h = 0; h < Hq; ++h) rms_norm(q + h * D, ptr(w[kQNorm]), D, eps, q + h * D);
        for (int64_t h = 0; h < Hkv; ++h) rms_norm(k + h * D, ptr(w[kKNorm]), D, eps, k + h * D);
      } else if (qk_norm == 2) {
        rms_norm(q, ptr(w[kQNorm]), QD, eps, q);
        rms_norm(k, ptr(w[kKNorm]), KD, eps, k);
      }
      if (clip > 0.f) {
        float* v = vb + b * KD;
        for (int64_t i = 0; i < QD; ++i) q[i] = std::min(std::max(q[i], -clip), clip);
        for (int64_t i = 0; i < KD; ++i) k[i] = std::min(std::max(k[i], -clip), clip);
        for (int64_t i = 0; i < KD; ++i) v[i] = std::min(std::max(v[i], -clip), clip);
      }
      // rotary (HF: cos/sin of float(position) * inv_freq, times the attention scaling)
      const float p = static_cast<float>(pos[b]);
      const float* freq = ptr(inv_freq);
      for (int64_t i = 0; i < half; ++i) {
        const float f = p * freq[i];
        cs[i] = std::cos(f) * rope_scale;
        cs[half + i] = std::sin(f) * rope_scale;
      }
      auto rotate = [&](float* x, int64_t heads) {
        for (int64_t h = 0; h < heads; ++h) {
          float* xh = x + h * D;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = xh[i], x2 = xh[half + i], c = cs[i], s = cs[half + i];
            const float a = x1 * c, bs = -x2 * s, d = x2 * c, e = x1 * s;
            xh[i] = a + bs;
            xh[half + i] = d + e;
          }
        }
      };
      rotate(q, Hq);
      rotate(k, Hkv);
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t at_col = ((row_of[b] * Hkv + h) * C + col_of[b]) * D;
        std::copy(k + h * D, k + (h + 1) * D, kcache + at_col);
        std::copy(vb + b * KD + h * D, vb + b * KD + (h + 1) * D, vcache + at_col);
      }
    }
    at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
      float* scores = scores_all + at::get_thread_num() * T;
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
        const float* q = qb + b * QD + h * D;
        const float* keys = kcache + (row_of[b] * Hkv + hk) * C * D;
        const float* vals = vcache + (row_of[b] * Hkv + hk) * C * D;
        const int64_t* m = mk + b * T;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < T; ++t) {
          if (m[t] == 0) continue;
          scores[t] = dot_f32(q, keys + t * D, D) * scaling;
          top = std::max(top, scores[t]);
        }
        float total = 0.f;
        for (int64_t t = 0; t < T; ++t) {
          if (m[t] == 0) continue;
          scores[t] = std::exp(scores[t] - top);
          total += scores[t];
        }
        float* out = attn + b * QD + h * D;
        std::fill(out, out + D, 0.f);
        for (int64_t t = 0; t < T; ++t) {
          if (m[t] == 0) continue;
          axpy_f32(scores[t] / total, vals + t * D, out, D);
        }
      }
    });
    run_products({{attn, QD, B, ptr(w[kO]), QD, H, ob, H}});
    add_bias(ob, w[kOBias], B, H, H);
    for (int64_t i = 0; i < B * H; ++i) hidden[i] += ob[i];

    // --- MoE / MLP ---
    for (int64_t b = 0; b < B; ++b) {
      rms_norm(hidden + b * H, ptr(w[kPostNorm]), H, eps, xn + b * H);
    }
    const bool routed = present(w[kRouter]);
    const bool shared = present(w[kSharedUp]);
    const bool shared_gated = shared && present(w[kSharedExpertGate]);
    const int64_t E = routed ? w[kRouter].size(0) : 0;
    const int64_t I = routed ? w[kGateUp].size(1) / 2 : 0;
    const int64_t S = shared ? w[kSharedUp].size(0) : 0;
    std::vector<Product> first;
    if (routed) first.push_back({xn, H, B, ptr(w[kRouter]), H, E, router, E});
    if (shared) {
      first.push_back({xn, H, B, ptr(w[kSharedGate]), H, S, shared_gu, 2 * S});
      first.push_back({xn, H, B, ptr(w[kSharedUp]), H, S, shared_gu + S, 2 * S});
      if (shared_gated) first.push_back({xn, H, B, ptr(w[kSharedExpertGate]), H, 1, shared_gate, 1});
    }
    run_products(first);
    std::vector<Product> ups, downs;
    std::vector<int64_t> expert_start;  // per used expert: first sorted entry; closed by `entries`
    std::vector<int64_t> expert_id;
    if (routed) {
      probs.resize(E);
      for (int64_t b = 0; b < B; ++b) {
        const float* r = router + b * E;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t e = 0; e < E; ++e) top = std::max(top, r[e]);
        float total = 0.f;
        for (int64_t e = 0; e < E; ++e) {
          probs[e] = std::exp(r[e] - top);
          total += probs[e];
        }
        for (int64_t e = 0; e < E; ++e) probs[e] /= total;
        float picked = 0.f;
        for (int64_t k = 0; k < top_k; ++k) {
          int64_t best = -1;
          for (int64_t e = 0; e < E; ++e) {
            bool taken = false;
            for (int64_t j = 0; j < k; ++j) taken = taken || chosen[b * top_k + j] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
          }
          chosen[b * top_k + k] = best;
          chosen_w[b * top_k + k] = probs[best];
          picked += probs[best];
        }
        if (norm_topk_prob) {
          for (int64_t k = 0; k < top_k; ++k) chosen_w[b * top_k + k] /= picked;
        }
      }
      expert_rows.resize(entries);
      for (int64_t i = 0; i < entries; ++i) expert_rows[i] = i;
      std::sort(expert_rows.begin(), expert_rows.end(), [&](int64_t a, int64_t c) {
        return chosen[a] != chosen[c] ? chosen[a] < chosen[c] : a < c;
      });
      for (int64_t i = 0; i < entries; ++i) {
        const int64_t entry = expert_rows[i];
        std::copy(xn + (entry / top_k) * H, xn + (entry / top_k + 1) * H, gathered + i * H);
        if (i == 0 || chosen[expert_rows[i - 1]] != chosen[entry]) {
          expert_start.push_back(i);
          expert_id.push_back(chosen[entry]);
        }
      }
      expert_start.push_back(entries);
      const float* gu_w = ptr(w[kGateUp]);
      const float* dn_w = ptr(w[kDown]);
      for (size_t u = 0; u + 1 < expert_start.size(); ++u) {
        const int64_t s0 = expert_start[u], m = expert_start[u + 1] - s0, e = expert_id[u];
        ups.push_back({gathered + s0 * H, H, m, gu_w + e * 2 * I * H, H, 2 * I, gate_up + s0 * 2 * I, 2 * I});
        downs.push_back({act + s0 * I, I, m, dn_w + e * H * I, I, H, down + s0 * H, H});
      }
      run_products(ups);
      for (int64_t i = 0; i < entries; ++i) {
        const float* g = gate_up + i * 2 * I;
        float* a = act + i * I;
        for (int64_t j = 0; j < I; ++j) a[j] = silu(g[j]) * g[I + j];
      }
    }
    if (shared) {
      for (int64_t b = 0; b < B; ++b) {
        const float* g = shared_gu + b * 2 * S;
        float* a = shared_act + b * S;
        for (int64_t j = 0; j < S; ++j) a[j] = silu(g[j]) * g[S + j];
      }
      downs.push_back({shared_act, S, B, ptr(w[kSharedDown]), S, H, shared_out, H});
    }
    run_products(downs);
    // y = sum over the row's experts in ascending expert order of w * down, then + the shared part.
    std::fill(ob, ob + B * H, 0.f);
    if (routed) {
      for (int64_t i = 0; i < entries; ++i) {
        const int64_t entry = expert_rows[i], b = entry / top_k;
        const float wt = chosen_w[entry];
        const float* d = down + i * H;
        float* y = ob + b * H;
        for (int64_t j = 0; j < H; ++j) y[j] += d[j] * wt;
      }
    }
    if (shared) {
      for (int64_t b = 0; b < B; ++b) {
        const float gate = shared_gated ? 1.f / (1.f + std::exp(-shared_gate[b])) : 1.f;
        float* y = ob + b * H;
        const float* s = shared_out + b * H;
        if (shared_gated) {
          for (int64_t j = 0; j < H; ++j) y[j] += gate * s[j];
        } else {
          for (int64_t j = 0; j < H; ++j) y[j] += s[j];
        }
      }
    }
    for (int64_t i = 0; i < B * H; ++i) hidden[i] += ob[i];
  }

  const int64_t N = static_cast<int64_t>(out_rows.size());
  for (int64_t i = 0; i < N; ++i) {
    rms_norm(hidden + out_rows[i] * H, ptr(final_norm), H, eps, xn + i * H);
  }
  at::Tensor logits = at::empty({N, VO}, opts);
  run_products({{xn, H, N, ptr(lm_head), H, VO, logits.mutable_data_ptr<float>(), VO}});
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_runtime, m) {
  m.def(
      "decode_step(Tensor ids, Tensor positions, Tensor mask, Tensor(a!)[] kv, Tensor[] weights, Tensor embed,"
      " Tensor final_norm, Tensor lm_head, Tensor inv_freq, int num_heads, int num_kv_heads, int head_dim,"
      " int top_k, bool norm_topk_prob, int qk_norm, float eps, float scaling, float rope_scale,"
      " float clip_qkv, Tensor? slots=None, Tensor? logit_rows=None) -> Tensor");
  // prompt tokens up to which callers should run a prompt through decode_step (see rows_mm_cpu.h)
  m.def("prompt_rows_max() -> int", []() -> int64_t { return prompt_rows_max(); });
}

TORCH_LIBRARY_IMPL(moe_runtime, CPU, m) {
  m.impl("decode_step", &decode_step_cpu);
}

}  // namespace moe_runtime
