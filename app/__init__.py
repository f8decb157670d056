"""The dspark-chat client side. It never imports torch: engine work runs in its own process."""
