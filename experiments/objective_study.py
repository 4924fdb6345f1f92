"""The shipped study, on the demo task (3 seeds each, about 25 minutes on a 2-core CPU):

  (a) classification fine-tuned from random weights vs from next-token pre-training,
  (b) frozen backbone (train.trainable=head) vs full fine-tuning,
  (c) labeled_pair (prompt masked) vs next_token on the same pairs, judged on held-out exact
      match of greedy completions.

    python -m experiments.objective_study [--runs runs/objective_study] [--seeds 3]

Runs go to --runs (checkpoints: not committed); tables and plots are copied to
experiments/results/objective_study/ with the command that made them.
"""
import argparse
import os
import shutil
import sys

from experiments import ablate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'objective_study')


def main(argv):
  parser = argparse.ArgumentParser(prog='python -m experiments.objective_study')
  parser.add_argument('--runs', default='runs/objective_study')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--jobs', type=int, default=1)
  args = parser.parse_args(argv)
  common = ['--seeds', str(args.seeds), '--jobs', str(args.jobs)]
  pre = os.path.join(args.runs, 'pretrain')
  studies = {
      'pretrain': ['--config=configs/demo.py', '--set', 'train.steps=300'],
      'classification': ['--config=configs/demo.py:classification',
                         '--sweep', f'train.init_from=,{pre}/base/seed_{{seed}}',
                         '--sweep', 'train.trainable=all,head'],
      'pair_vs_next_token': ['--config=configs/demo.py', '--sweep', 'objective=labeled_pair,next_token',
                             '--set', 'train.steps=250', '--eval-as', 'labeled_pair'],
  }
  for name, study in studies.items():
    ablate.main([*study, *common, '--out', os.path.join(args.runs, name)])
    dest = os.path.join(RESULTS, name)
    os.makedirs(dest, exist_ok=True)
    for f in os.listdir(os.path.join(args.runs, name)):
      if f.endswith(('.md', '.csv', '.png')):
        shutil.copy(os.path.join(args.runs, name, f), dest)
  with open(os.path.join(RESULTS, 'COMMAND'), 'w') as f:
    f.write('python -m experiments.objective_study ' + ' '.join(argv) + '\n')


if __name__ == '__main__':
  main(sys.argv[1:])
