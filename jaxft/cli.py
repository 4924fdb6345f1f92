"""Command-line entry points: a user's mistake ends in one `error: ...` line, a bug in a traceback."""
import sys

from jaxft import checkpoint, config, data

USER_ERRORS = (config.ConfigError, data.DataError, checkpoint.CheckpointMismatch,
               checkpoint.StorageError, FileNotFoundError, FileExistsError)


def run(main):
  """main(argv) with the user errors (bad config, data, checkpoint, storage, a missing file or an
  output that would overwrite one) reported."""
  try:
    main(sys.argv[1:])
  except USER_ERRORS as e:
    sys.exit(f'error: {e}')
