"""The inference side of dspark-chat: loading, drafters, the decode loop, the scheduler."""
