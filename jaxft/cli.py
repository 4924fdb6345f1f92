"""Command-line entry points: a user's mistake ends in one `error: ...` line, a bug in a traceback."""
import sys

from jaxft import checkpoint, config, data

USER_ERRORS = (config.ConfigError, data.DataError, checkpoint.CheckpointMismatch,
               checkpoint.StorageError, FileNotFoundError, FileExistsError,
               FloatingPointError)  # (A non-finite loss: the run diverged, or its data.)


def run(main):
  """main(argv) with the user errors (bad config, data, checkpoint, storage, a missing file, an
  output that would overwrite one, a diverged run) reported."""
  try:
    main(sys.argv[1:])
  except USER_ERRORS as e:
    sys.exit(f'error: {e}')
