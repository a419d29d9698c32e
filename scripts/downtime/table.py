#!/usr/bin/env python3
"""The issue-11 downtime table from a run.sh directory: python3 table.py OUTDIR [--scans]"""
import json, os, sys

out = sys.argv[1]
scans = '--scans' in sys.argv
starts = {}
rcs = []
for line in open(os.path.join(out, 'runs.txt')):
    p = line.split()
    if p[0] == 'rc':
        rcs.append(int(p[1]))
    else:
        starts[int(p[0])] = (p[1], p[2])

def ms(v):
    return '-' if v is None else f'{v:.1f}'

ok_lim = ok20 = n = 0
dts, errs, loads = [], [], []
def exp_part(e, k):
    # The expected part as the final phase measures it: finish includes a full final check's
    # passes; verify (the re-check of unvouched memory) is its own part. Older reports lack both.
    v = e.get(k + '_ms', 0.0)
    if k == 'finish':
        v += e.get('full_check_ms', 0.0)
    return v

print('| run | start (UTC) | load (1 min) | rounds | switch | expected | bound | downtime | pause exp/act | scan exp/act | verify exp/act | send exp/act | finish exp/act | within limit | within 20 % | verified |')
print('|' + '---|' * 16)
for i in sorted(starts):
    loads.append(float(starts[i][1]))
    try:
        d = json.load(open(os.path.join(out, f'run{i}.json')))
    except Exception as e:
        print(f'| {i} | {starts[i][0]} | {starts[i][1]} | no JSON ({e}) |')
        continue
    m = d['migration']
    e = m.get('downtime_estimate')
    f = m.get('final_phase')
    exp, act = m.get('expected_downtime_ms'), m.get('downtime_ms')
    if e is None or f is None or act is None:
        print(f"| {i} | {starts[i][0]} | {starts[i][1]} | {len(m['rounds'])} | failed: {(d.get('error') or {}).get('message', '')[:80]} |")
        continue
    lim = act <= m['max_downtime_ms']
    w20 = abs(exp - act) <= 0.2 * act
    n += 1; ok_lim += lim; ok20 += w20; dts.append(act); errs.append((exp - act) / act)
    print(f"| {i} | {starts[i][0]} | {starts[i][1]} | {len(m['rounds'])} | {m['switch_reason']} | {exp:.1f} ms | {(m.get('downtime_bound_ms') or 0):.1f} ms | **{act:.1f} ms**{'' if lim else ' (over)'} | {e['pause_ms']:.1f} / {f['pause_ms']:.1f} | {e['scan_ms']:.1f} / {f['scan_ms']:.1f} | {exp_part(e, 'verify'):.1f} / {f.get('verify_ms', 0.0):.1f} | {e['send_ms']:.1f} / {f['send_ms']:.1f} | {exp_part(e, 'finish'):.1f} / {f['finish_ms']:.1f} | {'yes' if lim else 'no'} | {'yes' if w20 else 'no'} | {'yes' if d['verified'] else 'NO'} |")
dts.sort()
if n:
    print(f"\nruns {n} (exit codes {sorted(set(rcs))}); load {min(loads):.1f}-{max(loads):.1f}; within limit {ok_lim}/{n}; expected within 20% {ok20}/{n}; downtime min {dts[0]:.1f} median {dts[len(dts)//2]:.1f} max {dts[-1]:.1f} ms")
    print('(exp-act)/act:', ' '.join(f'{x:+.0%}' for x in errs))
# Per part: how often the expected part was within 0.5 ms of the measured one, and the median miss.
parts = {'pause': [], 'scan': [], 'verify': [], 'send': [], 'check': [], 'finish': []}
send_from, raised, rehearsals = {}, {}, []
for i in sorted(starts):
    try:
        m = json.load(open(os.path.join(out, f'run{i}.json')))['migration']
        e, f = m['downtime_estimate'], m['final_phase']
    except Exception:
        continue
    if e is None or f is None:
        continue
    src = e.get('send_from', 'rounds')
    send_from[src] = send_from.get(src, 0) + 1
    p = m.get('final_priority') or {}
    how = 'not asked' if not p else f"fifo {p['priority']}, {p['threads']} threads" if p.get('threads') else f"{p.get('policy')} (not raised: {p.get('not_raised')})" if p.get('not_raised') else p.get('policy', '?')
    raised[how] = raised.get(how, 0) + 1
    rehearsals += [r['throughput'] / 1e6 for r in m['rounds'] if r['kind'] == 'rehearsal']
    for k in parts:
        parts[k].append(exp_part(e, k) - f.get(k + '_ms', 0.0))
if n:
    print('per part, expected - measured (ms): ' + '; '.join(
        f"{k}: within 0.5 ms in {sum(abs(x) <= 0.5 for x in v)}/{len(v)}, median {sorted(v)[len(v)//2]:+.1f}, worst {max(v, key=abs):+.1f}"
        for k, v in parts.items() if v and (k != 'verify' or any(v))))
if n:
    print('expected send from: ' + ', '.join(f'{k} {v}' for k, v in send_from.items())
          + '; final priority: ' + ', '.join(f'{k}: {v}' for k, v in raised.items()))
    if rehearsals:
        rehearsals.sort()
        print(f'rehearsal rounds: {len(rehearsals)}, throughput min {rehearsals[0]:.0f} median {rehearsals[len(rehearsals)//2]:.0f} max {rehearsals[-1]:.0f} MB/s')
if scans:
    # Per run: live scans (wall/cpu ms, pages found) and the final scan.
    for i in sorted(starts):
        try:
            m = json.load(open(os.path.join(out, f'run{i}.json')))['migration']
        except Exception:
            continue
        live = [(r['scan_ms'], r.get('scan_cpu_ms'), r.get('dirty_pages', r.get('write_faults'))) for r in m['rounds'] if r['kind'] == 'iterative']
        f = m.get('final_phase') or {}
        fr = [r for r in m['rounds'] if r['kind'] == 'final']
        e = m.get('downtime_estimate') or {}
        print(f"run {i}: live " + ' '.join(f"{w:.2f}/{ms(c)}ms:{p}" for w, c, p in live)
              + f" | final {f.get('scan_ms', 0):.2f}/{ms(f.get('scan_cpu_ms'))}ms meanwhile {e.get('meanwhile_bytes', 0)//4096}p"
              + f" | est scan {e.get('scan_ms', 0):.2f} fixed {e.get('scan_fixed_ms', 0):.2f} per MiB {e.get('scan_ms_per_mib', 0):.3f}")
