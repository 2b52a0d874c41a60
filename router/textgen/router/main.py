def main() -> None:
    print("router")
