import sys

try:
    from sandbox.cli import main

    code = main()
except KeyboardInterrupt:  # ^C while Python still loads us (the first ~20 ms): no traceback
    code = 130
sys.exit(code)
