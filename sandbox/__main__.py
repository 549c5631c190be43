import sys

try:
    from sandbox.cli import exit_now, main

    code = main()
except KeyboardInterrupt:  # ^C while Python still loads us (the first ~20 ms): no traceback
    sys.exit(130)
exit_now(code)
