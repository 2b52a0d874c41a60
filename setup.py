"""Packages live one folder per process (launcher/, router/, server/, ...), each
holding its part of the `textgen` namespace; map every package to its folder."""

from setuptools import find_namespace_packages, setup

ROOTS = ("launcher", "router", "server", "proto", "benchmark")

package_dir = {
    package: f"{root}/{package.replace('.', '/')}"
    for root in ROOTS
    for package in find_namespace_packages(root, include=["textgen.*"])
}
setup(packages=sorted(package_dir), package_dir=package_dir)
