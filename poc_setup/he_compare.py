"""Encrypted against plain aggregation, measured on real POC runs: `make poc-he`.

    python poc_setup/he_compare.py [--config app_configs/demo.yaml] [--set train.num_rounds=3] [--out docs/results/he]

The same job twice (same config and seed; federation.cross_site_eval off in both, since an HE job cannot hand its
encrypted global model to cross-site evaluation), each in its own freshly provisioned POC with TenSEAL contexts
(poc.py --he): federation.encryption none, then he. Both jobs carry the measuring probe (fedopal.he.WireSizeProbe:
each train result's size as FLARE serializes it). Writes he.json and he.md to --out: per round, the bytes on the
wire per site update, the sites' encrypt and decrypt seconds, the server's aggregation seconds, the accuracy of both
runs and its difference.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "poc_setup"))

import poc  # noqa: E402

FLAVORS = ("plain", "he")
HEADLINE = "personalized/test/balanced_accuracy"
GLOBAL_ONLY = "global_only/test/balanced_accuracy"


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_flavor(config: str, overrides: dict, flavor: str, root: str, sites: list[str], timeout_s: float) -> dict:
    """Export the job (no-code, with the probe), run it in its own POC, return where its files are."""
    from fedopal.config import load_config
    from fedopal.tools.job import export_job

    cfg = load_config(config, {**overrides, "federation.encryption": "none" if flavor == "plain" else "he",
                               "federation.cross_site_eval": False})
    cfg = cfg.model_copy(update={"name": f"{cfg.name}_{flavor}"})
    job = export_job(cfg, os.path.join(root, "jobs"), "no-code", measure_wire=True)
    ws, out = os.path.join(root, flavor, "nvflare_poc"), os.path.join(root, flavor, "results")
    if sites:  # None: measure the runs already in the workspace again
        poc.run(job, ws, os.path.join(root, flavor, "home"), sites, out, timeout_s, he=True)
    state = poc.Poc.load(ws)
    return {"job": job, "cfg": cfg, "prod_dir": state.prod_dir, "job_id": state.state.last_job_id,
            "server_app": os.path.join(out, state.state.last_job_id, "workspace", "app_server")}


def measure(run: dict) -> dict:
    """Per round: bytes per site update, site encrypt/decrypt seconds, server seconds, mean accuracies."""
    from fedopal.tools.report import collect_site_records

    rounds: dict[int, dict] = {}

    def at(r):
        return rounds.setdefault(r, {"message_bytes": [], "encrypt_s": [], "decrypt_s": [], "accept_s": 0.0,
                                     "aggregate_s": 0.0, "update_s": 0.0, HEADLINE: [], GLOBAL_ONLY: [],
                                     "received_norm": [], "started_at": [], "finished_at": []})

    for e in read_jsonl(os.path.join(run["server_app"], "fedopal_wire_bytes.jsonl")):
        at(e["round"])["message_bytes"].append(e["message_bytes"])
    for e in read_jsonl(os.path.join(run["server_app"], "fedopal_aggregation.jsonl")):
        for k in ("accept_s", "aggregate_s", "update_s"):
            at(e["round"])[k] += e.get(k, 0.0)
    for path in glob.glob(os.path.join(run["prod_dir"], "*", run["job_id"], "app_*", "fedopal_he_site.jsonl")):
        for e in read_jsonl(path):
            at(e["round"])[f"{e['op']}_s"].append(e["seconds"])
    for site, records in collect_site_records(run["prod_dir"]).items():
        for r in records:
            for k in (HEADLINE, GLOBAL_ONLY, "received_norm", "started_at", "finished_at"):
                if isinstance(r.get(k), (int, float)):
                    at(r["round"])[k].append(r[k])
    out = {}
    for r, v in sorted(rounds.items()):
        mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
        out[r] = {"message_bytes": mean(v["message_bytes"]), "encrypt_s": mean(v["encrypt_s"]),
                  "decrypt_s": mean(v["decrypt_s"]), "server_s": v["accept_s"] + v["aggregate_s"] + v["update_s"],
                  "bal_acc": mean(v[HEADLINE]), "bal_acc_global_only": mean(v[GLOBAL_ONLY]),
                  "received_norm": mean(v["received_norm"]), "sites": len(v[HEADLINE]),
                  "round_s": max(v["finished_at"]) - min(v["started_at"]) if v["started_at"] else None}
    return out


def markdown(result: dict) -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    plain, he = result["plain"]["rounds"], result["he"]["rounds"]
    lines = [f"### Encrypted (HE) against plain aggregation: {result['name']}, {result['sites']} sites, "
             f"{result['rounds']} rounds, seed {result['seed']}",
             "",
             "Real POC runs (`make poc-he`), one per flavor, the same job and seed; per round, the mean over sites. "
             "Bytes: one site update as FLARE serializes it for the network. Server: seconds the server spent "
             "accepting the round's updates, averaging them and (HE) adding the encrypted mean to the encrypted "
             "global model. Balanced accuracy: the sites' personalized models on their test splits (the headline) "
             "and the global adapter alone. Global norm: the L2 norm of the global tensors each site received "
             "(decrypted, under HE) at the start of the round. Round s: first site start to last site end.",
             "",
             "| round | bytes / update plain | bytes / update HE | × | site encrypt s | site decrypt s | server s plain "
             "| server s HE | round s plain | round s HE | global norm plain | global norm HE | bal. acc. plain "
             "| bal. acc. HE | Δ | global-only plain | global-only HE | Δ |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(set(plain) | set(he), key=int):
        p, h = plain.get(r, {}), he.get(r, {})
        pb, hb = p.get("message_bytes"), h.get("message_bytes")
        d = lambda k: (h[k] - p[k]) if p.get(k) is not None and h.get(k) is not None else None  # noqa: E731
        lines.append(
            f"| {r} | {f(pb, ',.0f')} | {f(hb, ',.0f')} | {f(hb / pb if pb and hb else None, '.0f')} | "
            f"{f(h.get('encrypt_s'), '.2f')} | {f(h.get('decrypt_s'), '.2f')} | {f(p.get('server_s'), '.3f')} | "
            f"{f(h.get('server_s'), '.3f')} | {f(p.get('round_s'), '.1f')} | {f(h.get('round_s'), '.1f')} | "
            f"{f(p.get('received_norm'), '.7f')} | {f(h.get('received_norm'), '.7f')} | {f(p.get('bal_acc'), '.4f')} | {f(h.get('bal_acc'), '.4f')} | "
            f"{f(d('bal_acc'), '+.4f')} | {f(p.get('bal_acc_global_only'), '.4f')} | "
            f"{f(h.get('bal_acc_global_only'), '.4f')} | {f(d('bal_acc_global_only'), '+.4f')} |")
    lines += ["", f"Final round mean balanced accuracy: plain {f(result['final']['plain'], '.4f')}, HE "
                  f"{f(result['final']['he'], '.4f')} (difference {f(result['final']['difference'], '+.4f')}). "
                  f"Site decrypt runs from round 2 (round 1's global model is the job's initial, unencrypted). "
                  f"Rounds 1 to {result['rounds']} took plain {result['plain']['wall_s']:.0f} s, HE "
                  f"{result['he']['wall_s']:.0f} s (first site start to last site end)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    from fedopal.config import parse_overrides

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "app_configs", "demo.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workspace", default=os.path.join(REPO, "workspace", "poc_he"))
    p.add_argument("--out", default=os.path.join(REPO, "workspace", "poc_he", "results"))
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--measure-only", action="store_true", help="no new runs: measure the ones in --workspace again")
    args = p.parse_args(argv)
    os.environ.setdefault("FEDOPAL_HOME", REPO)
    overrides = parse_overrides(args.set)
    runs = {}
    for flavor in FLAVORS:
        runs[flavor] = run_flavor(args.config, overrides, flavor, os.path.abspath(args.workspace),
                                  None if args.measure_only else
                                  [f"site-{i + 1}" for i in range(_num_sites(args.config, overrides))],
                                  args.timeout)
    cfg = runs["he"]["cfg"]
    result = {"name": cfg.name.removesuffix("_he"), "sites": cfg.federation.num_sites, "rounds": cfg.train.num_rounds,
              "seed": cfg.train.seed, "config": os.path.relpath(os.path.abspath(args.config), REPO),
              "overrides": args.set}
    for flavor, run in runs.items():
        rounds = measure(run)
        result[flavor] = {"rounds": {str(k): v for k, v in rounds.items()}, "job_id": run["job_id"],
                          "wall_s": sum(v["round_s"] or 0.0 for v in rounds.values())}
    last = str(cfg.train.num_rounds)
    fin = {f: result[f]["rounds"].get(last, {}).get("bal_acc") for f in FLAVORS}
    fin["difference"] = fin["he"] - fin["plain"] if None not in fin.values() else None
    result["final"] = fin
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "he.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "he.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"he-compare: {os.path.join(args.out, 'he.md')} and he.json")
    return 0


def _num_sites(config: str, overrides: dict) -> int:
    from fedopal.config import load_config

    return load_config(config, overrides).federation.num_sites


if __name__ == "__main__":
    sys.exit(main())
