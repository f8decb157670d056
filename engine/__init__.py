"""The inference side of dspark-chat: loading, drafters, the decode loop, the scheduler."""

import time

STARTED = time.monotonic()  # before the heavy imports, which the server reports as its first start-up phase
