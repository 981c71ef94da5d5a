"""Writes the notebooks in notebooks/ from the cell sources below (so they stay reviewable as code).

    .venv/bin/python scripts/build_notebooks.py                 # code only
    .venv/bin/python scripts/build_notebooks.py --execute 12    # and run them, keeping the outputs

Each notebook reads its size from the environment (FOCUSLENS_NB_N, default below) so that CI can
execute it quickly; in Jupyter, edit the `N = ...` line of the set-up cell.
"""

from __future__ import annotations

from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1] / "notebooks"

SETUP = """\
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import focuslens as fl
from focuslens.tasks import make_synthetic_qa, render

torch.set_num_threads(int(os.environ.get("FOCUSLENS_NB_THREADS", "1")))
N = int(os.environ.get("FOCUSLENS_NB_N", "{default_n}"))  # examples per condition: raise for tighter error bars
model = fl.load_model()  # embedded SmolLM2-135M-Instruct, offline
lens = fl.FocusLens(model)  # the notebook wrapper: every method returns the module functions' types
fl.plot.figures.notebook_figures()  # figures interactive, plus a static PNG where kaleido + Chromium work
info = lens.info
lens"""


def md(s: str):
    return nbf.v4.new_markdown_cell(s)


def code(s: str):
    return nbf.v4.new_code_cell(s)


NOTEBOOKS = {
    "00_your_own_prompt.ipynb": [
        md("# 0 · Your own prompt: from paragraphs you wrote to the heads that read them\n\n"
           "Notebooks 1–4 use synthetic tasks whose spans are known by construction. This one does every step on "
           "text written by hand: seven short paragraphs about made-up places (so the model cannot know the answer "
           "from its training), one of them marked as the relevant one, and a question. Then: the model's answer, "
           "every head's attention on the marked paragraph, a corrupted copy of the fact, patching and attribution "
           "with a logit-difference metric, ablation, split softmax and focus directions. Edit the paragraphs and "
           "rerun: it runs in about two minutes on a CPU."),
        code("import os\n"
             "os.environ.setdefault(\"HF_HUB_OFFLINE\", \"1\")\n"
             "import torch\n"
             "import focuslens as fl\n"
             "from focuslens.heads.patching import logit_diff_metric\n"
             "\n"
             "torch.set_num_threads(int(os.environ.get(\"FOCUSLENS_NB_THREADS\", \"1\")))\n"
             "model = fl.load_model()  # embedded SmolLM2-135M-Instruct, offline\n"
             "lens = fl.FocusLens(model)  # the notebook wrapper over the module functions\n"
             "tok = lens.tokenizer\n"
             "fl.plot.figures.notebook_figures()  # figures interactive, plus a static PNG where kaleido + Chromium work\n"
             "lens"),
        md("## 0.1 Write the paragraphs, mark the relevant one\n\n"
           "`fl.build_prompt` takes the parts in order: a `(name, text)` pair is a labelled segment whose exact token "
           "span it records, a plain string is unlabelled glue. `chat=True` makes it the user turn of the model's chat "
           "template. The answer is in `p4`; `p3` states another colour, a distractor."),
        code("PARAGRAPHS = {\n"
             "    \"p1\": \"Brindle Hollow is a small market town on the edge of the Sorrel Downs. Every spring it holds a bread fair \"\n"
             "          \"where bakers from nine villages compete for a copper ladle.\",\n"
             "    \"p2\": \"The river Osk rises in the Tallow Hills and runs south for ninety kilometres before it meets the sea at \"\n"
             "          \"Port Averly, where the ferries to the outer islands leave twice a day.\",\n"
             "    \"p3\": \"The old bridge at Farrow Point is painted red. It was rebuilt after the flood of 1902 and carries a single \"\n"
             "          \"narrow lane over the Osk.\",\n"
             "    \"p4\": \"The lighthouse on the island of Quenmore was built in 1871 by the engineer Tilda Marsh. Its tower is \"\n"
             "          \"painted green, and its lamp can be seen from forty kilometres away.\",\n"
             "    \"p5\": \"Quenmore has no cars. Visitors cross the island on foot or by pony cart, and the only shop sells wool, \"\n"
             "          \"lamp oil and postcards of the cliffs.\",\n"
             "    \"p6\": \"The Averly Gazette has been printed every Thursday since 1888. Its longest-serving editor, Edwin Cole, \"\n"
             "          \"wrote every weather report himself for thirty years.\",\n"
             "    \"p7\": \"In the Tallow Hills the shepherds still count their sheep in an old dialect, and the autumn sheep fair \"\n"
             "          \"ends with a race up the steepest slope of Mount Bray.\",\n"
             "}\n"
             "RELEVANT = \"p4\"  # the paragraph that answers the question\n"
             "QUESTION = \"What colour is the lighthouse on Quenmore?\"\n"
             "\n"
             "def build(paragraphs):\n"
             "    parts = [\"Read the paragraphs and answer the question.\\n\\n\"]\n"
             "    for name, text in paragraphs.items():\n"
             "        parts += [(name, text), \"\\n\\n\"]\n"
             "    return fl.build_prompt(tok, [*parts, f\"Question: {QUESTION}\"], chat=True)\n"
             "\n"
             "prompt = build(PARAGRAPHS)\n"
             "print(len(prompt), \"tokens; the relevant paragraph is tokens\", prompt[RELEVANT])\n"
             "print(repr(prompt.decode(tok, RELEVANT)))"),
        md("## 0.2 The model's answer\n\n"
           "Greedy decoding, stopped at the end of the turn or the first newline. Does the model read the marked "
           "paragraph, or the distractor's colour?"),
        code("answer = lens.generate(prompt)\n"
             "answer"),
        md("## 0.3 Score every head on the marked paragraph\n\n"
           "`with_response` appends the answer and labels it `response`; one forward pass then gives every head's "
           "attention mass from the response rows onto `p4` (`relevant`), onto the other paragraphs (`distractors`) "
           "and onto the first token (`sink`). The shipped ranking (`figures/contextual_heads.json`, 100 synthetic "
           "examples) is the reference for what one prompt says."),
        code("full = prompt.with_response(tok, answer)\n"
             "others = [full[n] for n in PARAGRAPHS if n != RELEVANT]\n"
             "hs = lens.score(full.tokens, response=full.response, relevant=full[RELEVANT], distractors=others)\n"
             "top = lens.heads(10, scores=hs)\n"
             "shipped = fl.score.load_heads(\"../figures/contextual_heads.json\", k=10, model=model)\n"
             "print(\"top-10 heads on this prompt:\", top)\n"
             "print(f\"{len(set(top) & set(shipped))} of them are in the shipped top-10\")\n"
             "lens.heatmap(hs, title=\"Attention mass from the answer onto the marked paragraph\", top_k=10)"),
        md("## 0.4 Corrupt the fact; a logit-difference metric\n\n"
           "Patching needs two prompts of the same token length that differ in the fact: the corrupted one says "
           "*red* in `p4`. Both get the start of the answer appended, so the next token is the colour, and the "
           "metric is logit(' green') − logit(' red') there. `logit_diff_metric` tokenises the answers with the "
           "model's tokenizer (mind the leading space); `multi_token=\"error\"` refuses an answer of several tokens "
           "instead of comparing first tokens, and the metric's repr says which tokens it compares."),
        code("corrupt = build({**PARAGRAPHS, RELEVANT: PARAGRAPHS[RELEVANT].replace(\"green\", \"red\")})\n"
             "START = \"The lighthouse on Quenmore is painted\"\n"
             "clean_p, corrupt_p = prompt.with_response(tok, START), corrupt.with_response(tok, START)\n"
             "assert len(clean_p) == len(corrupt_p) and clean_p.spans == corrupt_p.spans\n"
             "metric = logit_diff_metric(model, \" green\", \" red\", multi_token=\"error\")\n"
             "\n"
             "def margin(p=clean_p):\n"
             "    with torch.no_grad():\n"
             "        return float(metric(model(p.tokens[None])))\n"
             "\n"
             "m_clean, m_corrupt = margin(clean_p), margin(corrupt_p)\n"
             "print(metric)\n"
             "print(f\"clean {m_clean:+.2f}, corrupted {m_corrupt:+.2f}\")"),
        md("## 0.5 Attribution on every head, exact patching on the top ones\n\n"
           "Attribution patching estimates, from a clean pass, a corrupted pass and one backward pass, what copying "
           "each head's output from the clean into the corrupted run does to the metric. Exact patching runs one "
           "forward pass per head (all 270 heads take minutes on a CPU), so it checks the layers of the heads "
           "attribution ranks highest. Both are shown as the fraction of the logit difference recovered: 0 = "
           "corrupted, 1 = clean."),
        code("C, X = corrupt_p.tokens[None], clean_p.tokens[None]\n"
             "recovered = lambda r: (r - m_corrupt) / (m_clean - m_corrupt)\n"
             "est = recovered(lens.attribute(C, X, metric))  # [layer, head], every head\n"
             "H = lens.info.n_heads\n"
             "layers = sorted({int(i) // H for i in est.flatten().abs().argsort(descending=True)[:4]})\n"
             "exact = recovered(lens.patch(C, X, metric, layers=layers))  # NaN outside `layers`\n"
             "lens.heatmap(est, title=\"Attribution patching: fraction of the logit difference recovered\", top_k=10,\n"
             "             colorscale=\"RdBu\", zmin=-1, zmax=1, colorbar_title=\"recovered\")"),
        code("import plotly.graph_objects as go\n"
             "done = ~exact.isnan()\n"
             "x, y = exact[done], est[done]\n"
             "rank = lambda v: v.argsort().argsort().float()\n"
             "rho = float(torch.corrcoef(torch.stack([rank(x), rank(y)]))[0, 1])\n"
             "names = [f\"L{l}H{h}\" for l, h in done.nonzero().tolist()]\n"
             "lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))\n"
             "fig = go.Figure(go.Scatter(x=x.tolist(), y=y.tolist(), mode=\"markers\", text=names, name=\"head\",\n"
             "                           hovertemplate=\"%{text}: exact %{x:.3f}, attribution %{y:.3f}\"))\n"
             "fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode=\"lines\", line={\"dash\": \"dot\"}, name=\"y = x\"))\n"
             "fig.update_layout(title=f\"Exact patching vs attribution, layers {layers}: Spearman {rho:.2f}\",\n"
             "                  xaxis_title=\"exact: fraction recovered\", yaxis_title=\"attribution estimate\",\n"
             "                  width=620, height=460)\n"
             "fig"),
        md("## 0.6 Ablate the heads\n\n"
           "Necessity: zero the output of the top-10 heads of 0.3 and read the margin and the answer on the clean "
           "prompt, against 10 random heads (never against nothing)."),
        code("rnd = fl.evaluation.random_heads(model, 10, seed=0, exclude=top)\n"
             "print(f\"unablated: logit diff {m_clean:+.2f}; answer: {answer}\")\n"
             "for name, heads in [(\"top-10 contextual\", top), (\"10 random\", rnd)]:\n"
             "    with lens.ablate(heads):\n"
             "        print(f\"{name} ablated: logit diff {margin():+.2f}; answer: {lens.generate(prompt)}\")"),
        md("## 0.7 Split softmax: more attention on the marked paragraph\n\n"
           "Split softmax moves a head's attention mass π on the span to π^τ (τ = 1 is the identity). On the top-10 "
           "heads with the span of `p4` (the label you gave), does the margin of its colour over the distractor's "
           "grow, and does the answer change? Random heads are the control."),
        code("taus = [1.0, 0.5, 0.2, 0.1]\n"
             "\n"
             "def split_margins(heads):\n"
             "    out = []\n"
             "    for tau in taus:\n"
             "        with lens.split_softmax(heads, prompt[RELEVANT], tau=tau):\n"
             "            out.append(margin())\n"
             "    return out\n"
             "\n"
             "with lens.split_softmax(top, prompt[RELEVANT], tau=0.2):\n"
             "    print(\"answer with split softmax (top-10, τ = 0.2):\", lens.generate(prompt))\n"
             "fl.ablation_curve(taus, {\"top-10 contextual heads\": (split_margins(top), None),\n"
             "                         \"10 random heads\": (split_margins(rnd), None)},\n"
             "                  xaxis=\"τ\", yaxis=\"logit(' green') − logit(' red')\",\n"
             "                  title=\"Split softmax on the marked paragraph\")"),
        md("## 0.8 Focus directions: steering without the label\n\n"
           "Split softmax needs the span. Focus directions are one learned query vector per head, added with a factor "
           "α, that needs no label at inference. The directions shipped for SmolLM2 (likelihood objective, 50 heads, "
           "trained on synthetic multi-document QA: docs/figures.md) load with a check against the model; random "
           "directions of the same norms are the control."),
        code("from focuslens import directions as fd\n"
             "d = fl.FocusDirections.load(\"../experiments/results/figures/directions/likelihood-fe97dbe551d7c5d1\")\n"
             "control = fd.random_like(d, seed=0)\n"
             "alphas = [0.0, 0.5, 1.0]\n"
             "\n"
             "def steered_margins(directions):\n"
             "    out = []\n"
             "    for a in alphas:\n"
             "        with lens.steer(directions, alpha=a):\n"
             "            out.append(margin())\n"
             "    return out\n"
             "\n"
             "with lens.steer(d, alpha=1.0):\n"
             "    print(\"answer steered (α = 1):\", lens.generate(prompt))\n"
             "fl.ablation_curve(alphas, {\"shipped directions\": (steered_margins(d), None),\n"
             "                           \"random, matched norm\": (steered_margins(control), None)},\n"
             "                  xaxis=\"α\", yaxis=\"logit(' green') − logit(' red')\", title=\"Focus directions on your prompt\")"),
        md("To train directions on prompts of your own, each training example is the prompt with a response appended "
           "plus the relevant span: `fd.DirectionExample(prompt.with_response(tok, answer), relevant=prompt[RELEVANT])`. "
           "For task records (`focuslens.tasks.TaskExample`), `fd.make_direction_examples(model, examples)` builds them "
           "with the gold-only prompt's answer appended. Then `lens.train_directions(train, heads=top, "
           "objective=\"likelihood\", val_examples=val)` (notebook 3). Train on many prompts, not one."),
        code("own = fd.DirectionExample(prompt.with_response(tok, START + \" green.\"), relevant=prompt[RELEVANT])\n"
             "own.prompt.response, own.relevant"),
        md("## Recap\n\n"
           "- `fl.build_prompt` labels the paragraphs you write; `with_response` appends an answer or its start.\n"
           "- `lens.score(tokens, response=..., relevant=...)` scores every head on any span; `lens.heatmap` draws it.\n"
           "- A corrupted prompt of equal length and `logit_diff_metric` give patching (`lens.patch`) and its "
           "three-pass estimate (`lens.attribute`); check the estimate's top heads exactly.\n"
           "- `lens.ablate`, `lens.split_softmax` and `lens.steer` are context managers: the hooks are gone after the "
           "block. Compare each with random heads or random directions."),
    ],
    "01_contextual_heads.ipynb": [
        md("# 1 · Contextual heads: which heads read the relevant document?\n\n"
           "A model answering a question from twenty documents must *find* the one that holds the answer. "
           "Zhu et al. (2025) call **contextual heads** the attention heads whose answer tokens put the most "
           "attention mass on that relevant document. This notebook measures that mass for every head of "
           "SmolLM2-135M-Instruct, in one forward pass per example, and draws where the top heads sit.\n\n"
           "$$s^{l,h} = \\frac{1}{|R|}\\sum_{t\\in R}\\sum_{j\\in C} A^{l,h}_{t,j}$$\n\n"
           "with $R$ the response tokens and $C$ the gold document's tokens."),
        md("## 1.1 Set-up"),
        code(SETUP.format(default_n=30)),
        md("## 1.2 The task: one gold document among distractors\n\n"
           "Synthetic multi-document QA with made-up entities (closed-book accuracy ≈ 0). The prompt is the "
           "Lost-in-the-Middle template; every document's token span is known *by construction*."),
        code("examples = make_synthetic_qa(N, n_docs=10, seed=0)\n"
             "r = render(examples[0], model.tokenizer)\n"
             "print(r.prompt.text[-700:])\n"
             "print('gold document span:', r.relevant, '->', repr(r.prompt.decode(model.tokenizer, f'doc_{examples[0].gold_index + 1}')))"),
        md("## 1.3 Scores of one example\n\n"
           "Generate the model's answer, append it, and score every head on the gold document, the attention "
           "sink (first token) and the distractors — all from the same pass. No attention pattern is cached: "
           "the hooks reduce to per-head sums as they go."),
        code("print('answer:', lens.generate(r), '| gold:', r.answers)\n"
             "hs = lens.score(r)  # the model's own greedy answer appended, then one scoring pass\n"
             "print(hs.names[:3], '...', hs.relevant.shape)\n"
             "lens.heatmap(hs.relevant, title='One example: attention mass on the gold document', top_k=10)"),
        md("## 1.4 Dataset scores and the head-location heatmap\n\n"
           "Average over examples (the paper's plain mean, not filtered by correctness), then rank."),
        code("ds = lens.score_dataset([render(e, model.tokenizer) for e in examples], response='generate')\n"
             "top = lens.heads(20)  # the top-20 of the ranking just computed\n"
             "print(f'n = {ds.n}; top-10:', ', '.join(f'L{l}H{h}' for l, h in top[:10]))\n"
             "lens.heatmap(top_k=20, title=f'Contextual scores, SmolLM2, 10 docs, n={ds.n}')"),
        md("## 1.5 How concentrated is it?\n\nThe average head puts little mass on the gold document; a few heads put a lot."),
        code("m = ds.mean['relevant']\n"
             "print(f'average head {m.mean():.3f}, median {m.median():.3f}, best {m.max():.3f}')\n"
             "layers = sorted(l for l, _ in top)\n"
             "print('layers of the top-20:', layers)\n"
             "print('mean sink mass', float(ds.mean['sink'].mean()), '| distractors total', float(ds.mean['distractors_total'].mean()))"),
        md("## 1.6 Save the ranking\n\nA JSON file that `focuslens sweep --heads` and `focuslens train --heads` read; "
           "the authors' `relevant_heads.json` (`[[layer, head], ...]`) loads with `fl.score.load_heads`."),
        code("import tempfile, pathlib\n"
             "path = pathlib.Path(tempfile.mkdtemp()) / 'contextual_heads.json'\n"
             "ds.save(path)\n"
             "assert fl.score.load_heads(path, k=5) == top[:5]\n"
             "path"),
        md("## Recap\n\n- Contextual scores come from one forward pass per example, reduced inside hooks.\n"
           "- A handful of heads carry most of the attention on the relevant document.\n"
           "- Next: notebook 2 tests causally whether *more* attention there helps (split softmax)."),
    ],
    "02_split_softmax.ipynb": [
        md("# 2 · Split softmax: does more attention on the relevant document help?\n\n"
           "Split softmax (Zhu et al., §3) takes each query row of a chosen head, with mass $\\pi$ on the span $C$, "
           "and moves that mass to $\\pi^\\tau$, keeping the proportions inside and outside $C$. $\\tau=1$ is the "
           "identity; $\\tau<1$ raises attention on $C$. Applied to the top-k contextual heads with the *oracle* gold "
           "span, it tests whether those heads' attention is what limits the answer."),
        code(SETUP.format(default_n=24)),
        md("## 2.1 Rank heads on separate examples"),
        code("rank_ex = make_synthetic_qa(max(4, N // 2), n_docs=10, seed=1)  # ranking examples, disjoint from the test set\n"
             "lens.score_dataset([render(e, model.tokenizer) for e in rank_ex], response='generate', progress=False)\n"
             "ranking = lens.heads(info.n_layers * info.n_heads)\n"
             "ranking[:10]"),
        md("## 2.2 What split softmax does to one row\n\nThe edit is exact: with τ = 1 the logits are unchanged."),
        code("test = [render(e, model.tokenizer) for e in make_synthetic_qa(N, n_docs=10, seed=2)]\n"
             "r = test[0]\n"
             "toks = r.prompt.tokens[None]\n"
             "base = model(toks)\n"
             "with lens.split_softmax(ranking[:20], r.relevant, tau=1.0):\n"
             "    same = model(toks)\n"
             "with lens.split_softmax(ranking[:20], r.relevant, tau=0.2):\n"
             "    edited = model(toks)\n"
             "print('tau=1 max |Δlogit|:', float((same - base).abs().max()))\n"
             "print('tau=0.2 max |Δlogit|:', float((edited - base).abs().max()))\n"
             "assert fl.core.count_hooks(model) == 0  # nothing left on the model"),
        md("## 2.3 Accuracy vs k, with k random heads as the control\n\n"
           "An intervention to evaluate is a *spec*: a value that describes it (`fl.SplitSoftmax(heads, tau=...)`; "
           "the span is read from each example, `r.relevant`) and that the evaluator attaches per example. Its "
           "content identity keys any stored result, so two different interventions never share records."),
        code("acc = lambda spec=None, **kw: lens.evaluate(test, intervene=spec, progress=False, **kw).summary()\n"
             "base_s = acc()\n"
             "gold_s = lens.evaluate([t.example for t in test], variant='gold_only', progress=False).summary()\n"
             "ks, tau = [5, 20], 0.2\n"
             "top_res, rnd_res = [], []\n"
             "for k in ks:\n"
             "    top_res.append(acc(fl.SplitSoftmax(ranking[:k], tau=tau)))\n"
             "    rnd_res.append(acc(fl.SplitSoftmax(fl.evaluation.random_heads(model, k, seed=0), tau=tau)))\n"
             "for k, a, b in zip(ks, top_res, rnd_res):\n"
             "    print(f'k={k:>3}: top-k {a[\"accuracy\"]:.2f}±{a[\"accuracy_se\"]:.2f}   random {b[\"accuracy\"]:.2f}±{b[\"accuracy_se\"]:.2f}')"),
        code("fl.ablation_curve(ks, {f'top-k, τ={tau}': ([s['accuracy'] for s in top_res], [s['accuracy_se'] for s in top_res]),\n"
             "                       f'random k, τ={tau}': ([s['accuracy'] for s in rnd_res], [s['accuracy_se'] for s in rnd_res])},\n"
             "                  baselines={'original': base_s['accuracy'], 'gold only': gold_s['accuracy']},\n"
             "                  xaxis='k', yaxis='accuracy', title=f'Split softmax, n={N} per point')"),
        md("## 2.4 Necessity: ablating the contextual heads\n\n"
           "Split softmax asks whether *more* attention on the gold document is sufficient to help. Ablation asks "
           "whether the heads are necessary: zero their outputs (`fl.Ablate`) and compare with as many random heads."),
        code("abl_top = [acc(fl.Ablate(ranking[:k])) for k in ks]\n"
             "abl_rnd = [acc(fl.Ablate(fl.evaluation.random_heads(model, k, seed=0))) for k in ks]\n"
             "fl.ablation_curve(ks, {'zero-ablate top-k': ([s['accuracy'] for s in abl_top], [s['accuracy_se'] for s in abl_top]),\n"
             "                       'zero-ablate k random': ([s['accuracy'] for s in abl_rnd], [s['accuracy_se'] for s in abl_rnd])},\n"
             "                  baselines={'original': base_s['accuracy']}, xaxis='k', yaxis='accuracy',\n"
             "                  title=f'Ablation, n={N} per point')"),
        md("## Recap\n\n- Split softmax is exact (identity at τ = 1; hooks removed afterwards).\n"
           "- Editing the contextual heads moves accuracy toward the gold-only upper bound; random heads do much less.\n"
           "- It needs the oracle span. Notebook 3 learns *focus directions* that need no labels at inference."),
    ],
    "03_focus_directions.ipynb": [
        md("# 3 · Focus directions: steering contextual heads without labels\n\n"
           "A focus direction is one vector $u^{l,h}$ per head added to the post-RoPE query of every position, scaled "
           "by α. Because softmax ignores constants, this is a query-independent, key-dependent logit bias "
           "$\\alpha\\,u\\cdot k_j/\\sqrt d$: the head learns *which keys* to look at. Training uses the gold span once; "
           "applying needs none."),
        code(SETUP.format(default_n=16)),
        code("from focuslens import directions as fd\n"
             "rank_ex = make_synthetic_qa(max(4, N // 2), n_docs=10, seed=1)\n"
             "lens.score_dataset([render(e, model.tokenizer) for e in rank_ex], response='generate', progress=False)\n"
             "heads = lens.heads(20)\n"
             "train = fd.make_direction_examples(model, make_synthetic_qa(max(6, 2 * N), n_docs=10, seed=3))\n"
             "val = fd.make_direction_examples(model, make_synthetic_qa(max(3, N // 2), n_docs=10, seed=4))\n"
             "len(train), len(val)"),
        md("## 3.1 The paper's objective, on cached queries and keys\n\n"
           "One frozen forward pass per example caches the selected heads' response-row queries and all keys; the "
           "vectors are then optimised on those tensors — seconds, not minutes."),
        code("d_att = lens.train_directions(train, heads=heads, objective='attention', val_examples=val, progress=False)\n"
             "{k: v for k, v in d_att.training.items() if isinstance(v, (int, float, str))}"),
        md("## 3.2 Apply with α, save, load"),
        code("import tempfile\n"
             "test = [render(e, model.tokenizer) for e in make_synthetic_qa(N, n_docs=10, seed=5)]\n"
             "toks = test[0].prompt.tokens[None]\n"
             "base = model(toks)\n"
             "with d_att.apply(model, alpha=0.0):\n"
             "    assert torch.allclose(model(toks), base, atol=1e-6)  # alpha = 0 is the identity\n"
             "folder = tempfile.mkdtemp() + '/fd'\n"
             "d_att.save(folder)\n"
             "d2 = fl.FocusDirections.load(folder)\n"
             "with d2.apply(model, alpha=0.5):\n"
             "    out2 = model(toks)\n"
             "with d_att.apply(model, alpha=0.5):\n"
             "    out1 = model(toks)\n"
             "assert torch.equal(out1, out2)\n"
             "print(d2)"),
        md("## 3.3 Accuracy vs α, against random directions of matched norm"),
        code("def acc(d, a):  # a Steer spec: the directions applied with factor α, attached by the evaluator\n"
             "    return lens.evaluate(test, intervene=fl.Steer(d, alpha=a), progress=False).summary()\n"
             "alphas = [-0.5, 0.5, 1.0]\n"
             "rnd = fd.random_like(d_att, seed=0)\n"
             "res = {'learned (attention objective)': [acc(d_att, a) for a in alphas],\n"
             "       'random, matched norm': [acc(rnd, a) for a in alphas]}\n"
             "fl.ablation_curve(alphas, {k: ([s['accuracy'] for s in v], [s['accuracy_se'] for s in v]) for k, v in res.items()},\n"
             "                  xaxis='α', yaxis='accuracy', title=f'Focus directions, n={N} per point')"),
        md("## 3.4 Magnitude control (this project's own design)\n\n"
           "`alpha='auto'` chooses α per head and per input so that the last prompt row's attention on the sink falls "
           "by a target fraction — one probe pass, no labels."),
        code("auto = lens.evaluate(test, intervene=fl.Steer(d_att, alpha='auto'), progress=False).summary()\n"
             "print(f\"auto α: accuracy {auto['accuracy']:.2f} ± {auto['accuracy_se']:.2f} (n={auto['n']})\")"),
        md("## Recap\n\n- Focus directions are tiny artefacts (one d_head vector per head) saved as safetensors + JSON and "
           "checked against the model on load.\n- The paper's attention objective trains in seconds on cached q/k; "
           "`objective='likelihood'` trains through the frozen model on the answer's log-likelihood "
           "(see docs/directions.md for what each achieves on SmolLM2).\n- Always compare with matched-norm random "
           "directions before claiming an effect."),
    ],
    "04_patching.ipynb": [
        md("# 4 · Patching individual heads\n\n"
           "Which heads *carry* the answer from the gold document? Activation patching runs a **corrupted** prompt "
           "(the gold document replaced by a distractor) and restores one head's activation from the **clean** run; "
           "the metric's recovery says how much that head matters."),
        code(SETUP.format(default_n=10)),
        code("from focuslens.heads import patching\n"
             "ex = make_synthetic_qa(1, n_docs=3, seed=7)[0]  # short prompt: one forward pass per head and site\n"
             "clean, corrupt = patching.make_corrupted_pair(model, ex)\n"
             "# Append the start of the answer so that the next token is the value itself.\n"
             "gold_text = ex.ctxs[ex.gold_index].text\n"
             "prefix = gold_text[: gold_text.index(ex.answers[0])].strip()\n"
             "clean_p = clean.prompt.with_response(model.tokenizer, prefix)\n"
             "corrupt_p = corrupt.prompt.with_response(model.tokenizer, prefix)\n"
             "assert len(clean_p) == len(corrupt_p)\n"
             "print('clean answer:', clean.answers[0], '| corrupted document says:', corrupt.answers[0])\n"
             "print(repr(model.tokenizer.decode(clean_p.tokens[-12:])))"),
        code("metric = patching.logit_diff_metric(model, ' ' + clean.answers[0], ' ' + corrupt.answers[0])\n"
             "m_clean = float(metric(model(clean_p.tokens[None])))\n"
             "m_corrupt = float(metric(model(corrupt_p.tokens[None])))\n"
             "print(f'logit difference clean {m_clean:.2f}, corrupted {m_corrupt:.2f}')\n"
             "# One forward pass per head: all 30 layers take about two minutes on a CPU; small runs patch a band.\n"
             "LAYERS = range(info.n_layers) if N > 3 else range(14, 20)\n"
             "res = lens.patch(corrupt_p.tokens[None], clean_p.tokens[None], metric, site='z', layers=LAYERS, progress=True)\n"
             "recovered = (res - m_corrupt) / (m_clean - m_corrupt)\n"
             "lens.heatmap(recovered, title='Patching each head output (z) from clean into corrupted: fraction recovered', top_k=10)"),
        code("# Under grouped-query attention keys and values are shared: k/v patching has one column per KV head.\n"
             "res_v = lens.patch(corrupt_p.tokens[None], clean_p.tokens[None], metric, site='v', layers=range(14, 18))\n"
             "res_v.shape  # [n_layers, n_kv_heads]"),
        md("## Recap\n\n- `patching.patch_heads` returns a `[layer, head]` tensor like TransformerLens' patching module.\n"
           "- Sites: `z`, `q`, `k`, `v`, `pattern`; k/v are patched per KV head under grouped-query attention."),
    ],
    "05_paper_figures.ipynb": [
        md("# 5 · The paper's figures on SmolLM2, as measured\n\n"
           "Notebooks 1–4 run each method at a small size. This one shows the full-size figures that "
           "`experiments/figures.py` computed (one named, resumable command per figure; docs/figures.md), in one "
           "visual style: the same colour per condition everywhere, error bars ± 1 SE, n in every legend or title. "
           "It reads the stored figures (`figures/<name>.plotly.json`) and their tables (`figures/<name>.md`), so it "
           "runs in seconds and needs no model; a figure that has not been computed yet says which command makes it."),
        code("import json, pathlib\n"
             "import plotly.io as pio\n"
             "from IPython.display import Markdown, display\n"
             "import focuslens as fl\n"
             "fl.plot.figures.notebook_figures()  # interactive, plus a static PNG where kaleido + Chromium work\n"
             "FIG = pathlib.Path('..') / 'figures'\n"
             "COMMAND = {'headview': 'headview', 'fig3_split_softmax': 'fig3 --n 40', 'ablation_curves': 'ablation --n 40',\n"
             "           'positions': 'positions --n 20', 'fig4_focus_directions_alpha': 'fig4 --n 40'}\n"
             "\n"
             "def show(stem):\n"
             "    fig_path, table = FIG / f'{stem}.plotly.json', FIG / f'{stem}.md'\n"
             "    if not fig_path.exists():\n"
             "        print(f'{stem}: not computed yet; run  python experiments/figures.py {COMMAND[stem]}')\n"
             "        return None\n"
             "    display(Markdown(table.read_text()))\n"
             "    return pio.read_json(fig_path)"),
        md("## 5.1 A head's view of one prompt\n\n"
           "Before any statistics: what do the top contextual heads look at? For one test prompt, each row is one of the "
           "top-10 heads (ranked on separate training examples), each column a document in prompt order, each cell the "
           "head's attention mass from the answer tokens onto that document (hover: the document's title and opening "
           "words; the gold document is outlined). The right panel is the same prompt under split softmax (τ = 0.2) on "
           "these heads: the mass moves onto the gold column, and the title says whether the answer changed."),
        code("show('headview')"),
        md("## 5.2 Figure 3 · sufficiency: split softmax on the top-k contextual heads vs k random heads\n\n"
           "If the contextual heads are the ones that read the relevant context, raising their attention on the gold "
           "document (split softmax: mass π → π^τ) should move accuracy from the *unmodified* baseline toward the "
           "*gold-only* one, and the same edit on k random heads (mean of 3 seeds) should do much less. Smaller τ is a "
           "stronger edit. The *distractors-only* (negative) line is the floor: no gold document at all."),
        code("show('fig3_split_softmax')"),
        md("## 5.3 Necessity: ablating the contextual heads\n\n"
           "The converse question: does the model *need* these heads? Zero ablation sets a head's output to 0, mean "
           "ablation to its mean over training prompts; each is compared with as many random heads. The right panel "
           "uses gold-only prompts (no distractors): if ablating the top heads hurts there too, they matter for "
           "reading the context at all, not only for finding it among distractors."),
        code("show('ablation_curves')"),
        md("## 5.4 Lost in the middle: accuracy and attention vs gold position\n\n"
           "The same examples with the gold document moved to every position of a 10- and a 20-document prompt: "
           "accuracy unmodified, with split softmax and with focus directions (top row), and the top heads' attention "
           "mass on the gold document (bottom row). The question: does the U-shape of accuracy follow the heads' "
           "attention, and do the interventions flatten it?"),
        code("show('positions')"),
        md("## 5.5 Figure 4 · focus directions: accuracy vs α\n\n"
           "Learned focus directions (both objectives) on the top-k heads for k ∈ {5, 10, 20, 50}, across α "
           "(negative α pushes the other way), with random directions of matched per-head norm as the control. The "
           "dotted line marks the α chosen on the validation split — the only α that a test-set claim may use."),
        code("show('fig4_focus_directions_alpha')"),
        md("## Recap\n\n- Every figure here comes from one named command of `experiments/figures.py`, resumable and keyed "
           "by content (model, data, intervention, settings); its table gives n and ± SE for every point.\n"
           "- Sufficiency (Figure 3) and necessity (ablation) are measured against k random heads, never against "
           "nothing.\n- The head view and the position curves show *where* the attention goes, the accuracy curves "
           "*whether it matters*.\n- What they say on SmolLM2 (n = 40 per point, 20 for positions): split softmax on the "
           "top-20 heads lifts 0.25 to 0.875 (random heads ≈ 0.34); ablating the top-10 takes even gold-only prompts "
           "from 0.75 to 0.025 (random draws of 10: 0.03–0.98, one draw hit a head the model needs); the U of "
           "accuracy over positions follows the U of the heads' attention, and both interventions flatten it at 10 "
           "documents; likelihood directions reach 0.925 at the validation-chosen k = 50, α = 1, random vectors "
           "never beat unmodified, and negative α is the mirror image.\n- Numbers and commands: docs/figures.md."),
    ],
}


def build(name: str, cells: list):
    """The notebook ``name`` with stable cell ids (``<nn>-<index>``): a rebuild rewrites nothing that did not change."""
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.from_dict({**c, "id": f"{name[:2]}-{i:02d}"}) for i, c in enumerate(cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(nb, n: str) -> None:
    """Run ``nb`` top to bottom in place (outputs kept) at size ``FOCUSLENS_NB_N=n``."""
    import os

    import nbclient

    os.environ["FOCUSLENS_NB_N"] = n
    os.environ["TQDM_DISABLE"] = "1"  # committed outputs show results, not hundreds of progress-bar lines
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    nbclient.NotebookClient(nb, timeout=1800, startup_timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()


def main(argv: list[str] | None = None) -> None:
    """Write every notebook; with ``--execute N`` also run it at size N and keep its outputs."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--execute", metavar="N", help="run each notebook with FOCUSLENS_NB_N=N and save the outputs")
    ap.add_argument("--only", nargs="*", help="notebook file names to (re)build")
    args = ap.parse_args(argv)
    ROOT.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        if args.only and name not in args.only:
            continue
        nb = build(name, cells)
        if args.execute:
            t0 = time.time()
            execute(nb, args.execute)
            print(f"executed {name} at N={args.execute} in {time.time() - t0:.0f} s")
        nbf.write(nb, ROOT / name)
        print("wrote", ROOT / name)


if __name__ == "__main__":
    main()
