#!/usr/bin/env bash
# Perplexity of the files a `nkat-gguf frontier --out-dir D` run wrote, both texts, CHUNKS (default 4) chunks of 512, one thread,
# as JSON lines in /tmp/fr/ppl/ppl.jsonl (benchmarks/frontier_perplexity_table.py turns them into the table).
# Texts: load_text(None, "evaluation") and load_text(None, "licenses") written to /tmp/fr/{evaluation,licenses}.txt.
cd "$(dirname "$0")/.."
D=${1:-/tmp/fr/default}; P=SmolLM2-135M-Instruct.Q4_1
mkdir -p /tmp/fr/ppl
.venv/bin/python -c "from nkat_gguf.texts import load_text
for s in ('evaluation', 'licenses'): open(f'/tmp/fr/{s}.txt', 'w').write(load_text(None, s).content)"
files=("$(.venv/bin/python -c 'from nkat_gguf.default_model import default_model_path; print(default_model_path())')"
  $D/$P.Q4_0.plain.gguf $D/$P.IQ4_NL.imatrix.gguf $D/$P.Q3_K_M.imatrix.gguf
  $D/$P.IQ4_NL.imatrix.theta-r8-all.gguf $D/$P.IQ4_NL.imatrix.theta-r12-ffn.gguf $D/$P.IQ4_NL.imatrix.theta-r16-ffn.gguf
  $D/$P.Q4_0.imatrix.gguf $D/$P.IQ4_NL.imatrix.theta-r8-ffn.gguf $D/$P.IQ4_XS.imatrix.gguf
  $D/$P.Q4_0.imatrix.theta-r8-all.gguf $D/$P.IQ4_NL.imatrix.theta-r4-all.gguf $D/$P.IQ4_NL.imatrix.theta-r8-attn.gguf
  $D/$P.IQ3_S.imatrix.gguf $D/$P.IQ3_XXS.imatrix.gguf $D/$P.Q3_K_S.imatrix.gguf $D/$P.Q2_K.imatrix.gguf
  $D/$P.Q4_0.imatrix.theta-r4-all.gguf $D/$P.Q4_0.imatrix.theta-r8-ffn.gguf
  $D/$P.Q3_K_S.imatrix.theta-r16-all.gguf $D/$P.Q3_K_L.imatrix.gguf $D/$P.Q4_K_S.imatrix.gguf $D/$P.Q5_0.imatrix.gguf
  $D/$P.Q4_K_M.imatrix.gguf)
for f in "${files[@]}"; do
  for t in evaluation licenses; do
    r=$(nice -n 10 .venv/bin/nkat-gguf perplexity --model "$f" --text /tmp/fr/$t.txt --chunks ${CHUNKS:-4} --threads 1 --json 2>/dev/null)
    echo "{\"file\": \"$f\", \"text\": \"$t\", \"result\": $r}" >> /tmp/fr/ppl/ppl.jsonl
  done
done
echo done >> /tmp/fr/ppl/ppl.jsonl
