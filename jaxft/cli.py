"""Command-line entry points: a user's mistake ends in one `error: ...` line, a bug in a traceback,
Ctrl-C in one line (status 130), a closed output pipe (`| head`) in one line too."""
import errno
import os
import sys

from jaxft import checkpoint, config, data

USER_ERRORS = (config.ConfigError, data.DataError, checkpoint.CheckpointMismatch,
               checkpoint.StorageError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, IsADirectoryError,  # (These name the path.)
               FloatingPointError)  # (A non-finite loss: the run diverged, or its data.)


def run(main):
  """main(argv) with the user errors (bad config, data, checkpoint, storage, a missing file, an
  output that would overwrite one, a path that cannot be written, a full disk, a diverged run)
  reported."""
  try:
    main(sys.argv[1:])
  except USER_ERRORS as e:
    sys.exit(f'error: {e}')
  except BrokenPipeError:  # The output's reader has gone (`... | head`): no bug, no traceback.
    # Python's own flush of stdout at exit would fail again ("Exception ignored ..."): the rest
    # goes to /dev/null.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit('error: the output pipe was closed before everything was written')
  except OSError as e:  # A full disk, a quota or a read-only file system: the machine's, no bug.
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
      raise
    sys.exit(f'error: {e}')
  except KeyboardInterrupt:  # (In jaxft.train the second Ctrl-C: the first one saves and exits.)
    print('interrupted (Ctrl-C)', file=sys.stderr, flush=True)
    sys.stdout.flush()
    # 128 + SIGINT, as a shell reports it. Without the interpreter's shutdown: the run's own
    # clean-up has run (its `finally`s), and work XLA still has in flight (an interrupted
    # compile or init) made that shutdown segfault.
    os._exit(130)
