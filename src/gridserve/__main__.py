from gridserve.cli.main import app

if __name__ == "__main__":  # not when a spawned child process (the gateway's verifier) imports this module
    app()
