"""`python -m tfmp`: print the detected hardware and the policy `auto` picks."""

import tfmp


def main() -> None:
    hw = tfmp.detect_hardware()
    print(hw.describe())
    choice = tfmp.resolve_policy("auto", hw)
    if choice.source == "env":
        print(f"auto resolves to {choice.name}: {choice.reason}")


if __name__ == "__main__":
    main()
