"""A rough count of the memory traffic of a compiled XLA program: for each top-level op of the
optimized HLO's entry computation (a fusion, a library call, a copy...), the bytes of its operands
plus those of its results. A kernel reads its operands and writes its results once, so on a
device whose step is bound by memory traffic (the elementwise and reduction kernels of a GPU's
step) the total over the bandwidth estimates their time. It is an estimate, not a timing: caches,
a gemm's re-reads of its tiles and the kernels' own efficiency are not in it.

    XLA_FLAGS="--xla_dump_to=DUMP --xla_dump_hlo_as_text --xla_dump_hlo_module_re=train_step" \\
        python -m jaxft.bench --config=... --target=h100
    python -m experiments.hlo_traffic DUMP/*train_step*after_optimizations.txt [--top=25]

prints the total (and its time at the H100's 3.35 TB/s), then the ops grouped by the jax
operation they came from (their op_name metadata), largest first.
"""
import collections
import re
import sys

BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f16': 2, 'bf16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4,
         'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
SHAPE = re.compile(r'\b(' + '|'.join(BYTES) + r')\[([0-9,]*)\]')
OP = re.compile(r'\s*(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\((.*?)\)(?:, |$)')
FREE = ('parameter', 'get-tuple-element', 'bitcast', 'tuple', 'constant')  # No kernel, no traffic.


def nbytes(shapes):
  """Bytes of every array shape written in `shapes` ('f32[2,3]', or a tuple of them)."""
  total = 0
  for dtype, dims in SHAPE.findall(shapes):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * BYTES[dtype]
  return total


def traffic(hlo_text):
  """[(bytes, op name, opcode, jax op_name)] for the entry computation's ops that run a kernel."""
  entry = hlo_text[hlo_text.index('\nENTRY'):]
  entry = entry[:entry.index('\n}\n') + 1]
  sizes, rows = {}, []
  for line in entry.splitlines():
    m = OP.match(line)
    if not m:
      continue
    name, shape, opcode, args = m.groups()
    sizes[name] = nbytes(shape.split('{')[0] if not shape.startswith('(') else shape)
    if opcode in FREE:
      continue
    read = sum(sizes.get(a[1:], 0) for a in re.findall(r'%[\w.\-]+', args))
    op_name = re.search(r'op_name="([^"]*)"', line)
    rows.append((read + sizes[name], name, opcode, op_name.group(1) if op_name else ''))
  return rows


def main(argv):
  path = argv[0]
  top = next((int(a.split('=', 1)[1]) for a in argv[1:] if a.startswith('--top=')), 25)
  rows = traffic(open(path).read())
  total = sum(r[0] for r in rows)
  print(f'{total / 1e9:.3f} GB over {len(rows)} ops; {total / 3.35e12 * 1e3:.1f} ms at 3.35 TB/s')
  groups = collections.Counter()
  for size, _, _, op_name in rows:
    groups[op_name] += size
  for op_name, size in groups.most_common(top):
    print(f'{size / 1e9:8.3f} GB  {op_name}')


if __name__ == '__main__':
  main(sys.argv[1:])
